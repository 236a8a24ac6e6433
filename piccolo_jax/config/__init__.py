"""Every configuration type of the trainer, and TOML / `--set` loading: plain dataclasses, no JAX.

Lives here: `train` (TrainConfig, RunConfig, load_config), one module per section (`model`, `data`,
`loss`, `mesh`, `optim`) and `reference` (the README's generated configuration table).
May import: the standard library only — never JAX, Flax or another piccolo_jax subpackage, so that a
typo in `--set` or a bad config file is refused before JAX starts.
"""

from piccolo_jax.config.data import DataConfig
from piccolo_jax.config.loss import LossConfig
from piccolo_jax.config.mesh import MeshConfig
from piccolo_jax.config.model import ModelConfig
from piccolo_jax.config.optim import OptimConfig
from piccolo_jax.config.train import (
                                      STAGES,
                                      ConfigError,
                                      RunConfig,
                                      TrainConfig,
                                      config_from_dict,
                                      load_config,
                                      parse_override,
)

__all__ = ["STAGES", "ConfigError", "DataConfig", "LossConfig", "MeshConfig", "ModelConfig", "OptimConfig",
           "RunConfig", "TrainConfig", "config_from_dict", "load_config", "parse_override"]

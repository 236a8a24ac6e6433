"""The train state (step, float32 master weights, optimizer state, skipped-step count) and how it is
built: abstractly, then materialised already sharded (`create_train_state`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from piccolo_jax.config.model import ModelConfig
from piccolo_jax.model.bert import abstract_model, init_params
from piccolo_jax.parallel import sharding


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates applied
    params: Any  # float32 master weights
    opt_state: Any  # optax state (moments sharded per strategy)
    skipped: jax.Array  # int32 scalar: steps whose loss or gradient was not finite (update skipped)


def state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    strategy: str) -> TrainState:
    _, abstract, logical = abstract_model(model_cfg)
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=sharding.param_shardings(abstract, logical, mesh, strategy),
                      opt_state=sharding.opt_state_shardings(optimizer, abstract, logical, mesh, strategy),
                      skipped=rep)


def create_train_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                       strategy: str, key: jax.Array, params: Any | None = None) -> TrainState:
    """Build the state already sharded: random init (or given params) under jit with out_shardings.

    Given params may lack the Dense head (`FRESH_SUBTREES`): an encoder without one starts a model that has
    one, whose head is then the random init's (piccolo v2 adds its scaling layer so to a pretrained encoder).
    """
    shardings = state_shardings(model_cfg, optimizer, mesh, strategy)
    fresh = missing_subtrees(model_cfg, params)

    def build(k, p):
        if p is None:
            p = init_params(model_cfg, k)
        else:
            p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)
            if fresh:  # XLA keeps only the initialisation of the missing subtrees
                init = init_params(model_cfg, k)
                p = {**p, **{name: init[name] for name in fresh}}
        return TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p), jnp.zeros((), jnp.int32))

    if params is not None:  # host arrays go straight to their shards
        params = jax.device_put(params, {name: shardings.params[name] for name in params})
    return jax.jit(build, out_shardings=shardings)(key, params)


FRESH_SUBTREES = ("dense",)  # what given params may lack: initialised at random by create_train_state


def missing_subtrees(model_cfg: ModelConfig, params: Any | None) -> tuple[str, ...]:
    """The top-level subtrees of the model that `params` lacks (only FRESH_SUBTREES may be missing)."""
    if params is None:
        return ()
    _, abstract, _ = abstract_model(model_cfg)
    missing = tuple(name for name in abstract if name not in params)
    extra = sorted(set(params) - set(abstract))
    if extra or any(name not in FRESH_SUBTREES for name in missing):
        raise ValueError(f"the parameters do not fit the model: unexpected {extra}, missing {list(missing)}")
    return missing

"""Process-wide JAX settings a run asks for: compilation cache, GPU determinism, matmul precision.

`configure(run_cfg)` must run before JAX creates its backends (before the first `jax.devices()` or
computation) for the XLA flag to take effect; the trainer's command calls it first thing.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("piccolo_jax")
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def configure(run_cfg) -> list[str]:
    """Apply `run.compilation_cache`, `run.deterministic`, `run.matmul_precision`; returns log lines."""
    import jax

    notes = []
    if run_cfg.deterministic and DETERMINISTIC_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DETERMINISTIC_FLAG}".strip()
        notes.append("deterministic GPU reductions (--xla_gpu_deterministic_ops)")
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser(run_cfg.compilation_cache)
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        notes.append(f"compilation cache {cache}")
    if run_cfg.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", run_cfg.matmul_precision)
        notes.append(f"float32 matmul precision {run_cfg.matmul_precision}")
    return notes

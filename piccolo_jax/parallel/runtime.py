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
        # Programs that compile in under a second are not stored (JAX's default, 1.0 s; the environment's
        # JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS overrides it). Fused attention's custom partitioning
        # would put a Python function pointer into every cache key, so that no restart of a multi-device
        # run could hit the cache: leave it out (the partitioning rule is the same code in every process).
        jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)
        notes.append(f"compilation cache {cache}")
    if run_cfg.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", run_cfg.matmul_precision)
        notes.append(f"float32 matmul precision {run_cfg.matmul_precision}")
    return notes

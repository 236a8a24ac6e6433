"""Test setup: 8 simulated CPU devices, forced before JAX is imported anywhere, and one XLA compilation
cache for the whole run inside the repository's pytest cache (never the user's ~/.cache): the trainer
subprocesses inherit it, so the many runs of the same small configs compile each program once."""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
XLA_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "piccolo-jax-xla"
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(XLA_CACHE)  # subprocesses: runtime.configure reads it

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", str(XLA_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

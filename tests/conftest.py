"""Test setup, before JAX is imported anywhere (the trainer subprocesses inherit the environment):
8 simulated CPU devices, and the trainer's persistent XLA compilation cache (`run.compilation_cache`,
overridden by JAX_COMPILATION_CACHE_DIR) inside the repository's pytest cache, never the user's ~/.cache."""

import os
from pathlib import Path

# LLVM at -O0 without its expensive passes: the CPU executables compile in about two thirds of the time
# (the tiny test models run as fast). The HLO programs (partitioning, collectives, fusion, donation) are
# the ones XLA builds at any level; only machine-code generation differs.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "xla")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every program: the runs share many small ones

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

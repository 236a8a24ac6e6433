"""Test setup, before JAX is imported anywhere (the trainer subprocesses inherit the environment):
8 simulated CPU devices, and the trainer's persistent XLA compilation cache (`run.compilation_cache`,
overridden by JAX_COMPILATION_CACHE_DIR) inside the repository's pytest cache, never the user's ~/.cache."""

import os
from pathlib import Path

# Cheaper CPU code generation: LLVM at -O0 without its expensive passes, and XLA's classic loop emitter
# for fusions instead of its MLIR fusion emitters. A tiny model's step compiles 3-5x faster and runs
# about as fast. The HLO programs (partitioning, collectives, fusion decisions, donation) are the ones
# XLA builds with any of these settings; only the machine code differs.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "xla")
# Parquet datasets converted for memory-mapping (piccolo_jax.data.arrow_tables), likewise never in ~.
os.environ["PICCOLO_JAX_CACHE"] = str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "piccolo-jax")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every program: the runs share many small ones

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The modules that take longest (measured on 2 cores, slowest first) start first: `--dist loadscope` with
# `--no-loadscope-reorder` hands whole modules to the workers in collection order, so the workers finish
# together instead of one of them starting a long module last. Unlisted modules follow in their own order.
SLOWEST_MODULES_FIRST = (
    "test_run_errors.py", "test_multihost_cli.py", "test_v2_recipe.py", "test_lifecycle.py", "test_train_step.py",
    "test_packing.py", "test_object_storage.py", "test_train_cli.py", "test_hybrid_step.py", "test_tokenization.py",
    "test_compiles.py", "test_memory.py", "test_inference.py", "test_multihost.py", "test_losses.py",
    "test_data_tfds.py", "test_multihost_inference.py", "test_data_formats.py", "test_program_cache.py",
    "test_wheel.py", "test_cli_edges.py", "test_mteb.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's tests keep their order

"""One process of the multi-process train-step test (tests/test_multihost.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
        python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Every process joins the coordinator on 127.0.0.1:PORT, builds the mesh over all devices of all
processes, passes only its own rows of the global batch (`host_local_to_global`), runs one train step and
writes OUT_DIR/result_<PROCESS_ID>.npz: the loss, the grad norm, and the updated parameters and Adam's
first moment (mu = (1 - b1) * clipped gradient after step 1), gathered in full with `process_allgather`;
then the same step on packed rows, each process packing only its own rows (OUT_DIR/packed_<ID>.npz).

`run(mesh)` is the same computation for any mesh; the test calls it in one process over 8 devices.
"""

from __future__ import annotations

import itertools
import sys

import jax
import numpy as np
import optax
from helpers import pack_padded
from jax.experimental import multihost_utils

from piccolo_jax.config.model import ModelConfig
from piccolo_jax.data.packing import step_arrays
from piccolo_jax.parallel.sharding import (
    MeshConfig,
    batch_sharding,
    host_local_to_global,
    make_mesh,
)
from piccolo_jax.training.optim import OptimConfig, make_optimizer
from piccolo_jax.training.state import create_train_state
from piccolo_jax.training.step import LossConfig, make_train_step

CFG = ModelConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=16)  # dropout 0.1 on every site
OPT = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.01, clip_norm=1.0)
# GTE loss with 2 hard negatives, 2 gradient-caching chunks: 16 = 8 shards x 2 chunks x 1 row.
LOSS = LossConfig(kind="gte", temperature=0.05, block_size=8, num_chunks=2)
MESH = MeshConfig(data=4, fsdp=2, tensor=1, strategy="fsdp")  # 8 devices; parameters split over fsdp
B, TQ, TP, K = 16, 8, 12, 2
SHARDS = 8  # data x fsdp
PACKED_LENGTHS = (2 * TQ, 2 * TP)  # packed rows hold several documents (3 per block of one query)
# LLVM -O0 for the CPU executable: a third of the compile time; the HLO program is the jitted step's.
FAST = {"xla_backend_optimization_level": 0}


def make_batch() -> dict[str, np.ndarray]:
    """The global batch, identical in every process: random ids, right padding, >= 2 real tokens a row."""
    rng = np.random.default_rng(0)

    def rows(shape, t):
        ids = rng.integers(1, CFG.vocab_size, size=(*shape, t), dtype=np.int32)
        mask = (np.arange(t) < rng.integers(2, t + 1, size=shape)[..., None]).astype(np.int32)
        return ids * mask, mask

    out = {}
    out["query_input_ids"], out["query_attention_mask"] = rows((B,), TQ)
    out["passage_input_ids"], out["passage_attention_mask"] = rows((B,), TP)
    out["negative_input_ids"], out["negative_attention_mask"] = rows((B, K), TP)
    return out


def local_rows(mesh) -> slice:
    """The rows of the global batch that live on this process's devices (one contiguous block)."""
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((B,))
    blocks = sorted({idx[0].indices(B)[:2] for idx in index_map.values()})
    for (_, stop), (start, _) in itertools.pairwise(blocks):
        assert stop == start, f"rows of process {jax.process_index()} are not contiguous: {blocks}"
    return slice(blocks[0][0], blocks[-1][1])


def packed_rows(batch: dict, shards: int) -> dict:
    """This process's rows packed (`pack_padded`, rows of twice the padded lengths) into the packed
    shapes of the whole global batch, which every process derives from data they all hold."""
    whole = pack_padded(make_batch(), SHARDS, LOSS.num_chunks, lengths=PACKED_LENGTHS)
    blocks = SHARDS * LOSS.num_chunks
    rows = tuple(whole[f"packed_{s}_input_ids"].shape[0] // blocks for s in ("query", "document"))
    return step_arrays(pack_padded(batch, shards, LOSS.num_chunks, rows=rows, lengths=PACKED_LENGTHS))


def run(mesh, packed: bool = False) -> dict[str, np.ndarray]:
    """One train step from a random init (key 0) on `mesh`; the digest as host arrays. `packed`: each
    process packs only its own rows (pack_padded) and passes the packed layout."""
    optimizer = make_optimizer(OPT, total_steps=10)
    step = make_train_step(CFG, LOSS, optimizer, mesh, MESH.strategy)
    state = create_train_state(CFG, optimizer, mesh, MESH.strategy, jax.random.key(0))
    rows = local_rows(mesh)
    local = {k: v[rows] for k, v in make_batch().items()}
    if packed:
        local = packed_rows(local, SHARDS * (rows.stop - rows.start) // B)
    batch = host_local_to_global(local, mesh)
    key = jax.random.key(7)
    state, metrics = step.lower(state, batch, key).compile(FAST)(state, batch, key)

    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
    adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s))
    gathered = multihost_utils.process_allgather({"params": state.params, "mu": adam.mu, "metrics": metrics},
                                                tiled=True)
    out = {"rows": np.array([rows.start, rows.stop])}
    for path, x in jax.tree_util.tree_flatten_with_path(gathered)[0]:
        out[jax.tree_util.keystr(path)] = np.asarray(x)
    out["step"], out["skipped"] = np.asarray(int(state.step)), np.asarray(int(state.skipped))
    return out


def main(argv: list[str]) -> None:
    process_id, num_processes, port, out_dir = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    # Cross-process CPU collectives: gloo is this JAX's default; explicit, as some releases default to none.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
    assert jax.process_count() == num_processes and jax.process_index() == process_id
    assert jax.device_count() == 8, f"expected 8 devices over {num_processes} processes, got {jax.devices()}"
    mesh = make_mesh(MESH, jax.devices())
    np.savez(f"{out_dir}/result_{process_id}.npz", **run(mesh))
    np.savez(f"{out_dir}/packed_{process_id}.npz", **run(mesh, packed=True))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])

"""The collectives the compiled train step executes per step on 8 devices, counted from its optimised HLO
(`parallel.collectives`): gradient caching must sum each shard's chunk gradients locally and all-reduce
the parameter gradient once per step, not once per chunk (`grad_cache._two_passes` with `local_sum`).

Minimum (dp, P parameters, B pairs, width D, float32): the gradient all-reduce 4 P, plus the loss's
embedding all-gather and its cotangent reduction, 4 B D (1 + 1) each (bench_collectives.py prints the
full table for every strategy).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from piccolo_jax.config import LossConfig, MeshConfig, ModelConfig, OptimConfig
from piccolo_jax.model.bert import abstract_model
from piccolo_jax.parallel.collectives import parse_collectives, total_bytes
from piccolo_jax.parallel.sharding import batch_sharding, make_mesh
from piccolo_jax.training.optim import make_optimizer
from piccolo_jax.training.state import create_train_state, state_shardings
from piccolo_jax.training.step import make_train_step

CFG = ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=64)
PAIRS, LENGTH = 64, 16  # 64 = 8 shards x 4 chunks x 2 rows


def _compiled_hlo(strategy: str, num_chunks: int) -> str:
    mesh = make_mesh(MeshConfig(data=8, strategy=strategy))
    optimizer = make_optimizer(OptimConfig(), total_steps=100)
    shardings = state_shardings(CFG, optimizer, mesh, strategy)
    state = jax.eval_shape(lambda: create_train_state(CFG, optimizer, mesh, strategy, jax.random.key(0)))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    batch = {f"{side}_{kind}": jax.ShapeDtypeStruct((PAIRS, LENGTH), jnp.int32, sharding=batch_sharding(mesh))
             for side in ("query", "passage") for kind in ("input_ids", "attention_mask")}
    step = make_train_step(CFG, LossConfig(kind="in_batch", num_chunks=num_chunks), optimizer, mesh, strategy)
    return step.lower(state, batch, jax.random.key(0)).compile().as_text()


@pytest.mark.parametrize("num_chunks", [4])
def test_gradient_caching_all_reduces_the_gradient_once_per_step(num_chunks):
    params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_model(CFG)[1]))
    minimum = 4 * params + 2 * 4 * PAIRS * CFG.hidden_size * 2  # gradients + embeddings and their cotangents
    found = parse_collectives(_compiled_hlo("dp", num_chunks), num_devices=8)
    reduced = total_bytes(found, "all-reduce")
    # once per step: about 4 P (a few parameters' gradients are known zeros and skipped: 432,656 of
    # 432,896 bytes measured) and at most the minimum; all-reduced per chunk it would be ~num_chunks x 4 P
    assert 0.95 * 4 * params <= reduced <= minimum, (reduced, params, found)

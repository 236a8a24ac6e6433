"""Memory planning before the first step: compiled peak, a fake device limit, the suggested num_chunks."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from piccolo_jax.config.model import ModelConfig
from piccolo_jax.parallel.sharding import MeshConfig, make_mesh
from piccolo_jax.training import memory
from piccolo_jax.training.optim import OptimConfig, make_optimizer
from piccolo_jax.training.step import LossConfig

CFG = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=128, remat="full")
MiB = 1024 ** 2


def test_compiled_peak_counts_arguments_outputs_and_temporaries():
    x = jax.ShapeDtypeStruct((1024, 256), jnp.float32)  # 1 MiB
    plain = jax.jit(lambda a: a * 2).lower(x).compile()
    donated = jax.jit(lambda a: a * 2, donate_argnums=0).lower(x).compile()
    assert memory.compiled_peak_bytes(plain) == 2 * MiB  # argument + output
    m = memory.memory_breakdown(donated)
    assert m["aliased"] == MiB and m["peak"] == MiB  # the output reuses the donated argument
    assert memory.device_memory_limit() is None  # CPU reports no allocator limit


def test_chunk_candidates_split_every_shard_evenly():
    assert memory.chunk_candidates(32_768, 8, 16)[:4] == [32, 64, 128, 256]
    assert memory.chunk_candidates(32_768, 8, 16)[-1] == 4_096  # one pair per device per chunk
    assert memory.chunk_candidates(96, 8, 1) == [2, 4]  # 96 / 8 = 12 rows per shard: 3 and 6 are skipped
    assert memory.chunk_candidates(64, 8, 8) == []


def _setup(num_chunks=1, pairs=64, length=64):
    mesh = make_mesh(MeshConfig(data=1, strategy="dp"), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimConfig(), total_steps=10)
    loss_cfg = LossConfig(kind="in_batch", num_chunks=num_chunks)
    batch = memory.abstract_batch(mesh, pairs, length, length)
    return memory.train_step_peak_for(CFG, loss_cfg, optimizer, mesh, "dp", batch)


def test_refuses_a_config_that_does_not_fit_and_names_the_chunks_that_do():
    peak_for = functools.cache(_setup())  # each num_chunks compiled once, however often fit_num_chunks asks
    peaks = {c: peak_for(c) for c in (1, 2, 4, 8)}
    assert peaks[1] > peaks[2] > peaks[4] > peaks[8]  # one chunk's activations at a time
    # A device whose limit (after the 95 % headroom) lies between the peaks of 4 and 2 chunks.
    limit = int((peaks[2] + peaks[4]) / 2 / memory.HEADROOM)
    candidates = memory.chunk_candidates(64, 1, 1)
    with pytest.raises(memory.NotEnoughMemory, match=r"loss\.num_chunks=1: .* set loss\.num_chunks=4 ") as e:
        memory.fit_num_chunks(peak_for, 1, candidates, limit)
    assert "\n" not in str(e.value)
    report = memory.fit_num_chunks(peak_for, 4, memory.chunk_candidates(64, 1, 4), limit)
    assert report.num_chunks == 4 and report.peak == peaks[4] <= limit and report.peaks == {4: peaks[4]}
    assert "loss.num_chunks=4" in report.line()
    # Nothing fits: the message says what was tried.
    with pytest.raises(memory.NotEnoughMemory, match="no num_chunks tried fits"):
        memory.fit_num_chunks(peak_for, 1, [2], limit)
    # No limit reported (CPU): nothing compiled, nothing checked.
    unchecked = memory.fit_num_chunks(lambda c: pytest.fail("compiled"), 1, candidates, None)
    assert unchecked.peak is None and "not checked" in unchecked.line()


def test_scanned_remat_keeps_the_peak_flat_in_depth():
    """remat 'full' over scanned layers keeps one block's internals plus one [B, T, D] per layer: four
    times the layers cost far less than four times the activation memory."""
    def temp(layers, remat):
        cfg = dataclasses.replace(CFG, num_hidden_layers=layers, remat=remat)
        mesh = make_mesh(MeshConfig(data=1, strategy="dp"), devices=jax.devices()[:1])
        optimizer = make_optimizer(OptimConfig(), total_steps=10)
        batch = memory.abstract_batch(mesh, 64, 64, 64)
        compiled = memory.compile_train_step(cfg, LossConfig(), optimizer, mesh, "dp", batch)
        return memory.memory_breakdown(compiled)["temporaries"]

    full_2, full_8, none_8 = temp(2, "full"), temp(8, "full"), temp(8, "none")
    assert full_8 < 0.5 * none_8, (full_8, none_8)
    assert full_8 < 2 * full_2, (full_2, full_8)

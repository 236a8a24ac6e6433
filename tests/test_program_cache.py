"""The train step's program cache (piccolo_jax.training.program_cache) against the jitted step itself.

The reference is `make_train_step`'s jitted step run on the same state, batch, key and learning-rate
numbers; a cached step, whether it traced its program or read it back from disk, must give the same
state and metrics bit for bit (it runs the same StableHLO), keep the state's shardings, and be looked up
under a key that changes with everything the program depends on and with nothing else.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_step import CFG, OPT, make_batch

from piccolo_jax.config.train import load_config
from piccolo_jax.parallel.sharding import MeshConfig, host_local_to_global, make_mesh, replicated
from piccolo_jax.training import program_cache
from piccolo_jax.training.optim import LearningRate, make_optimizer
from piccolo_jax.training.program_cache import CachedStep, ProgramCache, config_fingerprint, step_description
from piccolo_jax.training.state import create_train_state
from piccolo_jax.training.step import LossConfig, make_train_step

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

LOSS = LossConfig(kind="in_batch", temperature=0.05, num_chunks=2)
BUILT = step_description(CFG, LOSS, "fsdp")


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
    optimizer, schedule = make_optimizer(OPT, 10), LearningRate(OPT, 10)
    step = make_train_step(CFG, LOSS, optimizer, mesh, "fsdp", schedule)

    def fresh_state():
        return create_train_state(CFG, optimizer, mesh, "fsdp", jax.random.key(0))

    batch = host_local_to_global(make_batch(False), mesh)
    key = jax.random.fold_in(jax.random.key(1), 3)
    lr_values = jnp.asarray(schedule.values)
    reference = step(fresh_state(), batch, key, task="retrieval", lr_values=lr_values)
    return mesh, step, fresh_state, batch, key, lr_values, jax.device_get(reference)


def _assert_same(got, want, shardings_of=None):
    (state, metrics), (ref_state, ref_metrics) = got, want
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(metrics) == sorted(ref_metrics)
    for k in metrics:
        np.testing.assert_array_equal(np.asarray(metrics[k]), np.asarray(ref_metrics[k]), err_msg=k)
    if shardings_of is not None:
        assert [a.sharding for a in jax.tree.leaves(state)] == jax.tree.leaves(shardings_of)


def test_traced_and_read_back_programs_equal_the_jitted_step(setup, tmp_path, caplog):
    mesh, step, fresh_state, batch, key, lr_values, reference = setup
    cache = ProgramCache(tmp_path, {"config": "a"})
    first = CachedStep(step, cache, replicated(mesh), BUILT)
    state = fresh_state()
    shardings = jax.tree.map(lambda a: a.sharding, state)
    with caplog.at_level(logging.INFO, logger="piccolo_jax"):
        out = first(state, batch, key, task="retrieval", lr_values=lr_values)
    assert first.loaded == ["traced"] and len(list(tmp_path.glob("*.exported"))) == 1
    assert "traced; kept in" in caplog.text
    _assert_same(out, reference, shardings)
    # The next step reuses the program in memory: no second lookup.
    first(out[0], batch, key, task="retrieval", lr_values=lr_values)
    assert first.loaded == ["traced"]

    # A new start (new objects, same directory and context) reads the program instead of tracing it.
    second = CachedStep(step, ProgramCache(tmp_path, {"config": "a"}), replicated(mesh), BUILT)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="piccolo_jax"):
        out = second(fresh_state(), batch, key, task="retrieval", lr_values=lr_values)
    assert second.loaded == ["read"] and "traced program read from" in caplog.text
    _assert_same(out, reference, shardings)


def test_a_damaged_or_foreign_entry_is_traced_again_and_replaced(setup, tmp_path):
    mesh, step, fresh_state, batch, key, lr_values, reference = setup
    first = CachedStep(step, ProgramCache(tmp_path, {}), replicated(mesh), BUILT)
    first(fresh_state(), batch, key, lr_values=lr_values)
    (entry,) = tmp_path.glob("*.exported")
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])  # a truncated file
    again = CachedStep(step, ProgramCache(tmp_path, {}), replicated(mesh), BUILT)
    _assert_same(again(fresh_state(), batch, key, lr_values=lr_values), reference)
    assert again.loaded == ["traced"]
    jax.export.deserialize(bytearray(entry.read_bytes()))  # rewritten whole (not byte for byte: names differ)


def test_an_unwritable_cache_warns_and_the_step_still_runs(setup, tmp_path, caplog):
    """The step runs the program it traced whether or not it could be stored (the path of the first test)."""
    (tmp_path / "file").write_text("not a directory")
    cache = ProgramCache(tmp_path / "file" / "programs", {})
    with caplog.at_level(logging.WARNING, logger="piccolo_jax"):
        assert cache.store("key", b"program") is False
    assert "cannot be written" in caplog.text and str(tmp_path / "file" / "programs") in caplog.text
    assert cache.load("key") is None


def _key(cache: ProgramCache, args, task="retrieval") -> str:
    """The key a cached step looks its program up under, for `args` as its batch (no state)."""
    leaves, treedef = jax.tree.flatten(args)
    return CachedStep(None, cache, None, BUILT).key(task, jax.tree.structure(()), treedef, leaves)


def test_the_key_follows_what_the_program_depends_on(setup, monkeypatch):
    mesh = setup[0]

    def fingerprint(*sets):
        return config_fingerprint(load_config(None, "pretrain", list(sets)).to_dict())

    base = fingerprint()
    # Passed as data or never read by the step: the same program.
    for sets in (["run.steps=99", "run.save_every=3"], ["optim.lr=0.3"],
                 ["optim.warmup_steps=17"], ["run.seed=5"]):
        assert fingerprint(*sets) == base, sets
    # Read by the step: another program.
    for sets in (["loss.temperature=0.02"], ["loss.num_chunks=4"], ["optim.weight_decay=0.1"],
                 ["optim.schedule=\"constant\""], ["model.hidden_dropout_prob=0.0"], ["parallel.strategy=\"fsdp\""]):
        assert fingerprint(*sets) != base, sets

    arrays = {"x": jax.device_put(np.zeros((8, 4), np.float32), replicated(mesh))}
    cache = ProgramCache("/unused", base)
    key = _key(cache, arrays)
    assert _key(ProgramCache("/unused", base), arrays) == key  # a new start, the same key
    assert _key(ProgramCache("/unused", fingerprint("loss.temperature=0.02")), arrays) != key
    assert _key(cache, arrays, task="sts") != key
    assert _key(cache, {"x": jnp.zeros((8, 4), jnp.float32)}) != key  # uncommitted: no sharding
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    assert _key(cache, {"x": jax.device_put(np.zeros((8, 4), np.float32), split)}) != key
    assert _key(cache, {"x": jax.device_put(np.zeros((8, 5), np.float32), replicated(mesh))}) != key
    assert _key(cache, {"x": jax.device_put(np.zeros((8, 4), np.int32), replicated(mesh))}) != key
    assert _key(cache, {"y": arrays["x"]}) != key
    # Another mesh over the same devices in another order: another program.
    flipped = jax.sharding.Mesh(mesh.devices[::-1], mesh.axis_names)
    assert _key(cache, {"x": jax.device_put(np.zeros((8, 4), np.float32), replicated(flipped))}) != key
    # Edited source, or another JAX numerics setting: another program.
    monkeypatch.setattr(program_cache, "source_digest", lambda: "edited")
    assert _key(ProgramCache("/unused", base), arrays) != key
    monkeypatch.undo()
    precision = jax.config.jax_default_matmul_precision
    try:
        jax.config.update("jax_default_matmul_precision", "bfloat16")
        assert _key(ProgramCache("/unused", base), arrays) != key
    finally:
        jax.config.update("jax_default_matmul_precision", precision)
    assert _key(ProgramCache("/unused", base), arrays) == key


def test_steps_built_from_other_configs_have_other_keys(setup):
    """The memory check builds steps with other loss.num_chunks over the run's cache: each its own program."""
    mesh = setup[0]
    cache = ProgramCache("/unused", {})
    args = [jax.device_put(np.zeros((8, 4), np.float32), replicated(mesh))]
    treedef = jax.tree.structure({"a": 0})

    def key(loss=LOSS, model=CFG, strategy="fsdp"):
        return CachedStep(None, cache, None, step_description(model, loss, strategy)).key("retrieval", treedef,
                                                                                          treedef, args)

    assert key() == key()
    assert key(loss=LossConfig(kind="in_batch", temperature=0.05, num_chunks=4)) != key()
    assert key(model=dataclasses.replace(CFG, attention_probs_dropout_prob=0.0)) != key()
    assert key(strategy="zero1") != key()


def test_the_source_digest_covers_every_module(monkeypatch):
    import piccolo_jax

    before = program_cache.source_digest()
    files = sorted(Path(piccolo_jax.__file__).parent.rglob("*.py"))
    assert len(files) > 40 and any(f.name == "grad_cache.py" for f in files)
    real = type(files[0]).read_bytes
    target = next(f for f in files if f.name == "grad_cache.py")
    monkeypatch.setattr(type(files[0]), "read_bytes",
                        lambda self: real(self) + (b"#" if self == target else b""))
    assert program_cache.source_digest() != before

"""The sharded train step against a single-device reference.

The reference is written here from the public pieces only: `model.encode` with per-row dropout keys
fold_in(key, global row) (queries 0..B-1, positives B..2B-1, negative (i, j) at 2B + iK + j), the loss
functions of `losses`, `jax.value_and_grad` on one device, and the first AdamW step in numpy (float64).
It shares no code with `grad_cache`, `train_step` or `sharding`.

Everything checked is read from what the step returns: the loss and grad_norm metrics, the updated
parameters, and Adam's first moment, which after one step is mu = (1 - b1) * clip(g), the gradient the
step used. Dropout is on in every run (rate 0.1 on every site), with the same key in step and reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from piccolo_jax.config.model import ModelConfig
from piccolo_jax.losses import contrastive as losses
from piccolo_jax.model.bert import encode, init_params
from piccolo_jax.parallel.sharding import MeshConfig, host_local_to_global, make_mesh
from piccolo_jax.training.optim import OptimConfig, make_optimizer
from piccolo_jax.training.state import create_train_state
from piccolo_jax.training.step import LossConfig, make_train_step

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

# Tiny encoder: every dimension (32, 64, 96, 16) divides by 8, so every sharding rule applies.
CFG = ModelConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=16)  # dropout 0.1 on every site (default)
# Constant lr from step 0; clipping at 1.0 is active for this batch (checked: grad norm > 1).
OPT = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.01, clip_norm=1.0)
TEMPERATURE = 0.05
BLOCK = 16  # loss blocks smaller than the batch: 64 queries = 4 blocks
B, TQ, TP, K = 64, 8, 12, 2  # 64 = 8 shards x 8 chunks x 1 row
STEP_KEY = jax.random.key(7)
# LLVM -O0 for the CPU executables: a third of the compile time. The HLO program (partitioning,
# collectives, donation, output shardings) is the one the jitted step runs; only code generation differs.
FAST = {"xla_backend_optimization_level": 0}

RTOL = 1e-5  # loss, grad norm, gradients
# Gradient atol, for entries that are ~0 or cancel to rounding level: 3e-6 x the largest entry of the same
# tensor (measured: <= 1e-6), plus 1e-9 x the largest of all for tensors whose gradient is exactly 0
# (pooler, attention key bias).
GRAD_ATOL_TENSOR, GRAD_ATOL_GLOBAL = 3e-6, 1e-9


# ---------------------------------------------------------------------------------------------- data
def make_batch(negatives: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with right padding; every row has at least 2 real tokens."""
    rng = np.random.default_rng(seed)

    def rows(shape, t):
        ids = rng.integers(1, CFG.vocab_size, size=(*shape, t), dtype=np.int32)
        lengths = rng.integers(2, t + 1, size=shape)
        mask = (np.arange(t) < lengths[..., None]).astype(np.int32)
        return ids * mask, mask

    out = {}
    out["query_input_ids"], out["query_attention_mask"] = rows((B,), TQ)
    out["passage_input_ids"], out["passage_attention_mask"] = rows((B,), TP)
    if negatives:
        out["negative_input_ids"], out["negative_attention_mask"] = rows((B, K), TP)
    return out


@functools.cache
def host_params() -> dict:
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
    return jax.tree.map(np.asarray, params)


# ---------------------------------------------------------------------------------------------- reference
@functools.cache
def reference(kind: str) -> tuple[float, dict]:
    """(loss, gradient) of the global batch on one device, float64 numpy."""
    dev = jax.devices()[0]

    def loss_fn(params, batch, key):
        def embed(ids, mask, rows):
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)
            return encode(CFG, params, ids, mask, dropout_key=keys)["embeddings"]

        q = embed(batch["query_input_ids"], batch["query_attention_mask"], jnp.arange(B))
        if kind == "in_batch":
            p = embed(batch["passage_input_ids"], batch["passage_attention_mask"], B + jnp.arange(B))
            return losses.in_batch_softmax_loss(q, p, TEMPERATURE)[0]
        # positives and negatives share the passage length: one encoder call over 64 + 128 documents
        d = embed(jnp.concatenate([batch["passage_input_ids"], batch["negative_input_ids"].reshape(B * K, TP)]),
                  jnp.concatenate([batch["passage_attention_mask"],
                                   batch["negative_attention_mask"].reshape(B * K, TP)]),
                  B + jnp.arange(B + B * K))
        p, n = d[:B], d[B:].reshape(B, K, -1)
        if kind == "hard_negative":
            return losses.hard_negative_loss(q, p, n, TEMPERATURE)[0]
        return losses.gte_loss(q, p, n, TEMPERATURE)[0]

    args = jax.device_put((host_params(), make_batch(kind != "in_batch"), STEP_KEY), dev)
    fn = jax.jit(jax.value_and_grad(loss_fn))
    loss, grads = fn.lower(*args).compile(FAST)(*args)
    assert all(x.devices() == {dev} for x in jax.tree.leaves(grads))
    return float(loss), jax.tree.map(lambda g: np.asarray(g, np.float64), grads)


def first_adamw_step(params: dict, grads: dict) -> tuple[dict, dict, float, dict]:
    """numpy AdamW step 1 (optax conventions): (new params, mu, global grad norm, clipped gradient)."""
    norm = float(np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads))))
    clipped = jax.tree.map(lambda g: g * min(1.0, OPT.clip_norm / norm), grads)
    mu = jax.tree.map(lambda g: (1 - OPT.b1) * g, clipped)

    def update(path, p, g):  # step 1: bias-corrected mu_hat = g, sqrt(nu_hat) = |g|
        decay = OPT.weight_decay if path[-1].key in ("kernel", "embedding") else 0.0
        return p - OPT.lr * (g / (np.abs(g) + OPT.eps) + decay * p)

    new = jax.tree_util.tree_map_with_path(update, jax.tree.map(np.float64, params), clipped)
    return new, mu, norm, clipped


# ---------------------------------------------------------------------------------------------- the step
def adam_state(opt_state) -> optax.ScaleByAdamState:
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1, opt_state
    return found[0]


def mesh_of(mesh_shape: tuple[int, int, int], strategy: str):
    data, fsdp, tensor = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, strategy=strategy))
    assert mesh.devices.size == 8
    return mesh


@functools.cache
def step_setup(mesh_shape: tuple[int, int, int], strategy: str, kind: str, num_chunks: int):
    """(mesh, optimizer, step, compiled-step cache) of one configuration."""
    mesh = mesh_of(mesh_shape, strategy)
    optimizer = make_optimizer(OPT, total_steps=10)
    loss_cfg = LossConfig(kind=kind, temperature=TEMPERATURE, block_size=BLOCK, num_chunks=num_chunks)
    return mesh, optimizer, make_train_step(CFG, loss_cfg, optimizer, mesh, strategy), []


def call_step(config: tuple, state, batch):
    """The configuration's jitted step on (state, batch, STEP_KEY); compiled once per session."""
    _, _, step, compiled = step_setup(*config)
    if not compiled:
        compiled.append(step.lower(state, batch, STEP_KEY).compile(FAST))
    return compiled[0](state, batch, STEP_KEY)


def shardings_of(state) -> dict:
    adam = adam_state(state.opt_state)
    return jax.tree.map(lambda x: x.sharding, {"params": state.params, "mu": adam.mu, "nu": adam.nu})


@functools.cache
def run_step(mesh_shape, strategy: str, kind: str, num_chunks: int = 1) -> dict:
    """One train step from host_params(); host copies of what came back, and the shardings."""
    config = (mesh_shape, strategy, kind, num_chunks)
    mesh, optimizer, _, _ = step_setup(*config)
    state = create_train_state(CFG, optimizer, mesh, strategy, jax.random.key(0), params=host_params())
    created_shardings = shardings_of(state)
    # Single process: its local rows are the whole global batch.
    new_state, metrics = call_step(config, state, host_local_to_global(make_batch(kind != "in_batch"), mesh))
    return {
        "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
        "metric_skipped": int(metrics["skipped"]), "step": int(new_state.step), "skipped": int(new_state.skipped),
        "params": jax.tree.map(np.asarray, new_state.params),
        "mu": jax.tree.map(np.asarray, adam_state(new_state.opt_state).mu),
        "shardings": shardings_of(new_state), "created_shardings": created_shardings,
    }


def assert_tree_close(actual, desired, rtol, atol, what):
    flat_a = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
    flat_d = jax.tree_util.tree_flatten_with_path(desired)[0]
    assert len(flat_a) == len(flat_d)
    for path, d in flat_d:
        np.testing.assert_allclose(flat_a[path], d, rtol=rtol, atol=atol,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


def check_against_reference(out: dict, kind: str):
    ref_loss, ref_grads = reference(kind)
    ref_params, ref_mu, ref_norm, ref_clipped = first_adamw_step(host_params(), ref_grads)
    assert ref_norm > OPT.clip_norm  # the clipping branch is exercised
    np.testing.assert_allclose(out["loss"], ref_loss, rtol=RTOL)
    np.testing.assert_allclose(out["grad_norm"], ref_norm, rtol=RTOL)
    g_max = max(np.abs(g).max() for g in jax.tree.leaves(ref_clipped))
    flat_mu = dict(jax.tree_util.tree_flatten_with_path(out["mu"])[0])
    flat_params = dict(jax.tree_util.tree_flatten_with_path(out["params"])[0])
    for (path, g), want_mu, want in zip(jax.tree_util.tree_flatten_with_path(ref_clipped)[0],
                                        jax.tree.leaves(ref_mu), jax.tree.leaves(ref_params)):
        name = jax.tree_util.keystr(path)
        g_atol = GRAD_ATOL_TENSOR * np.abs(g).max() + GRAD_ATOL_GLOBAL * g_max
        np.testing.assert_allclose(flat_mu[path], want_mu, rtol=RTOL, atol=(1 - OPT.b1) * g_atol,
                                   err_msg=f"gradient (Adam mu) {name}")
        # Updated parameters. Step 1 moves each entry by lr * (g / (|g| + eps) + decay), ~lr * sign(g): an
        # error e in g moves it by at most lr * e / (|g| + eps), so each entry's tolerance follows its |g|.
        tol = 1e-7 + OPT.lr * np.minimum(2.0, (RTOL * np.abs(g) + g_atol) / (np.abs(g) + OPT.eps))
        err = np.abs(flat_params[path] - want)
        assert np.all(err <= tol), (f"params after one AdamW step {name}", int(np.sum(err > tol)),
                                    float(np.max(err - tol)))
    assert (out["step"], out["skipped"], out["metric_skipped"]) == (1, 0, 0)


# ---------------------------------------------------------------------------------------------- 1. meshes
# (data, fsdp, tensor), strategy, loss: every strategy on two meshes, every loss at least twice.
CONFIGS = [
    ((8, 1, 1), "dp", "in_batch"),
    ((8, 1, 1), "zero1", "gte"),
    ((4, 2, 1), "fsdp", "gte"),
    ((4, 2, 1), "zero1", "hard_negative"),
    ((2, 1, 4), "zero1", "in_batch"),
    ((2, 1, 4), "dp", "hard_negative"),
    ((2, 2, 2), "fsdp", "in_batch"),
]
IDS = [f"{'x'.join(map(str, m))}-{s}-{k}" for m, s, k in CONFIGS]


@pytest.mark.parametrize("mesh_shape,strategy,kind", CONFIGS, ids=IDS)
def test_step_matches_single_device(mesh_shape, strategy, kind):
    check_against_reference(run_step(mesh_shape, strategy, kind), kind)


# ---------------------------------------------------------------------------------------------- 2. chunks
@pytest.mark.parametrize("num_chunks", [1, 2, 4, 8])
def test_gradient_cache_chunks_match_unchunked(num_chunks):
    # 64 = 8 shards x 8 chunks x 1 row; 64 queries, 64 positives, 128 hard negatives; dropout on.
    # The reference is the unchunked single-device gradient (num_chunks=1 here is CONFIGS' second run).
    check_against_reference(run_step((8, 1, 1), "zero1", "gte", num_chunks=num_chunks), "gte")


# ---------------------------------------------------------------------------------------------- 3. shardings
def split_axes(sharding, ndim: int) -> tuple[tuple[str, ...], ...]:
    """Per dimension, the mesh axes (of size > 1) it is split over."""
    sizes = sharding.mesh.shape
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    out = []
    for entry in spec:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(tuple(n for n in names if sizes[n] > 1))
    return tuple(out)


SHAPES = [x.shape for x in jax.tree.leaves(jax.eval_shape(lambda: init_params(CFG, jax.random.key(0))))]
QUERY, OUT = ("layers", "attention", "query"), ("layers", "attention", "output")
FFN_IN, FFN_OUT = ("layers", "ffn_in"), ("layers", "ffn_out")
WORD, LN = ("embeddings", "word"), ("layers", "ffn_norm")
F, T = ("fsdp",), ("tensor",)
L = ((),)  # the leading "layers" axis of the stacked blocks: never split
# Expected split of representative parameters, written out by hand from the strategies' definitions:
# fsdp splits each "embed" (model width) dimension over fsdp; tensor splits heads / mlp / vocab dimensions.
EXPECTED_PARAMS = {
    ((4, 2, 1), "fsdp"): {QUERY + ("kernel",): L + (F, ()), QUERY + ("bias",): L + ((),),
                          OUT + ("kernel",): L + ((), F), FFN_IN + ("kernel",): L + (F, ()),
                          FFN_OUT + ("kernel",): L + ((), F), WORD + ("embedding",): ((), F), LN + ("scale",): L + (F,)},
    ((2, 1, 4), "dp"): {QUERY + ("kernel",): L + ((), T), QUERY + ("bias",): L + (T,), OUT + ("kernel",): L + (T, ()),
                        OUT + ("bias",): L + ((),), FFN_IN + ("kernel",): L + ((), T), FFN_IN + ("bias",): L + (T,),
                        FFN_OUT + ("kernel",): L + (T, ()), WORD + ("embedding",): (T, ()), LN + ("scale",): L + ((),)},
    ((2, 2, 2), "fsdp"): {QUERY + ("kernel",): L + (F, T), QUERY + ("bias",): L + (T,), OUT + ("kernel",): L + (T, F),
                          FFN_IN + ("kernel",): L + (F, T), FFN_OUT + ("kernel",): L + (T, F),
                          WORD + ("embedding",): (T, F), LN + ("scale",): L + (F,)},
}
EXPECTED_PARAMS[((2, 1, 4), "zero1")] = EXPECTED_PARAMS[((2, 1, 4), "dp")]  # zero1 = dp for parameters


def leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def check_shardings(mesh_shape, strategy, shardings):
    params, mu, nu = shardings["params"], shardings["mu"], shardings["nu"]
    n_data = mesh_shape[0] * mesh_shape[1]
    for p_sh, m_sh, n_sh, shape in zip(*(jax.tree.leaves(t) for t in (params, mu, nu)), SHAPES, strict=True):
        assert m_sh == n_sh
        p_axes, m_axes = split_axes(p_sh, len(shape)), split_axes(m_sh, len(shape))
        if mesh_shape == (8, 1, 1) or strategy == "zero1":  # parameters replicated (except over tensor)
            assert all(a in ((), T) for a in p_axes), p_axes
        if strategy == "zero1" and any(a == () and d % n_data == 0 for a, d in zip(p_axes, shape)):
            # ZeRO-1: a moment is additionally split over all data devices wherever a dimension is free
            # (every leaf here but the 1-D ones already split over tensor).
            assert np.prod(m_sh.shard_shape(shape)) * n_data == np.prod(p_sh.shard_shape(shape)), (shape, m_sh)
            assert sum(a in (("data",), ("data", "fsdp")) for a in m_axes) == 1, m_axes
        else:
            assert m_axes == p_axes  # moments follow the parameters
    for path, axes in EXPECTED_PARAMS.get((mesh_shape, strategy), {}).items():
        assert split_axes(leaf(params, path), len(axes)) == axes, (path, leaf(params, path).spec)
    if strategy == "fsdp":  # every matrix (kernel, embedding table; stacked or not) is split over fsdp
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        assert all(F in split_axes(s, len(shape)) for (path, s), shape in zip(flat, SHAPES, strict=True)
                   if path[-1].key in ("kernel", "embedding"))


@pytest.mark.parametrize("mesh_shape,strategy,kind", CONFIGS, ids=IDS)
def test_state_shardings(mesh_shape, strategy, kind):
    out = run_step(mesh_shape, strategy, kind)
    check_shardings(mesh_shape, strategy, out["shardings"])  # what the step returns
    check_shardings(mesh_shape, strategy, out["created_shardings"])  # what create_train_state built


@pytest.mark.parametrize("mesh_shape,strategy", [((4, 2, 1), "fsdp"), ((8, 1, 1), "zero1")],
                         ids=["4x2x1-fsdp", "8x1x1-zero1"])
def test_random_init_is_created_sharded(mesh_shape, strategy):
    """Random init (no host params): every array is born on its shards, with the step's shardings."""
    mesh = mesh_of(mesh_shape, strategy)
    state = create_train_state(CFG, make_optimizer(OPT, total_steps=10), mesh, strategy, jax.random.key(3))
    check_shardings(mesh_shape, strategy, shardings_of(state))
    adam = adam_state(state.opt_state)
    for x in jax.tree.leaves((state.params, adam.mu, adam.nu)):
        assert len(x.addressable_shards) == 8
        if not x.sharding.is_fully_replicated:
            assert max(s.data.size for s in x.addressable_shards) < x.size  # no device holds all of it
    # The same values as the model's own initialiser, so every shard got its own slice.
    ref = jax.tree.map(np.asarray, jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(3)))
    assert_tree_close(jax.tree.map(np.asarray, state.params), ref, 0, 0, "init")


# ---------------------------------------------------------------------------------------------- 4. guard
def test_non_finite_loss_skips_update():
    config = ((4, 2, 1), "fsdp", "gte", 1)
    mesh, optimizer, _, _ = step_setup(*config)
    params = jax.tree.map(np.copy, host_params())
    params["layers"]["ffn_in"]["bias"][0, 5] = np.nan  # layer 0 of the stacked blocks  # every embedding, hence the loss, becomes NaN
    state = create_train_state(CFG, optimizer, mesh, "fsdp", jax.random.key(0), params=params)
    opt_before = jax.tree.map(np.asarray, state.opt_state)
    new_state, metrics = call_step(config, state, host_local_to_global(make_batch(True), mesh))
    assert np.isnan(float(metrics["loss"]))
    assert (int(new_state.step), int(new_state.skipped), int(metrics["skipped"])) == (0, 1, 1)
    assert_tree_close(jax.tree.map(np.asarray, new_state.params), params, 0, 0, "params")  # NaN == NaN here
    assert_tree_close(jax.tree.map(np.asarray, new_state.opt_state), opt_before, 0, 0, "opt_state")
    check_shardings((4, 2, 1), "fsdp", shardings_of(new_state))  # the skipped step keeps the shardings

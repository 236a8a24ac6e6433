"""Contrastive losses against independent references.

References: float64 numpy formulas written out below with explicit loops; dense (unblocked) jnp
formulas for gradients; central finite differences of the numpy formulas; sentence-transformers'
MultipleNegativesRankingLoss; a single device for the sharded computation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from piccolo_jax.losses.contrastive import (
    gte_loss,
    hard_negative_loss,
    in_batch_softmax_loss,
)

RTOL = 1e-5
ATOL = 1e-6  # for values near zero (neg_sim of random vectors, a loss the positive dominates)


def loss_atol(tau: float) -> float:
    """Absolute float32 error of a loss computed from logits s / tau, |s| <= 1: each logsumexp rounds at
    ~eps32 x max|logit| = eps32 / tau, and the loss is a difference of two (1.2e-5 at tau 0.02)."""
    return max(ATOL, 2 * float(np.finfo(np.float32).eps) / tau)


def _normalise(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_embeddings(batch, num_negs, dim=16, seed=0):
    """Normalised float32 q [B, D], p [B, D], negs [B, K, D] (None for K = 0).

    Positives and hard negatives are noisy copies of their query, so accuracy lands strictly
    between 0 and 1 and the metrics are informative.
    """
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, dim))
    p = q + 0.9 * rng.normal(size=(batch, dim))
    negs = q[:, None, :] + 1.1 * rng.normal(size=(batch, max(num_negs, 1), dim))
    as32 = lambda x: _normalise(x).astype(np.float32)
    return as32(q), as32(p), (as32(negs) if num_negs else None)


def _lse(x):
    m = max(x)
    return m + np.log(sum(np.exp(v - m) for v in x))


# ---------------------------------------------------------------------------------------------
# numpy float64 references, one query row at a time


def ref_softmax(q, p, negs, tau):
    """q_i against every positive and every hard negative of the batch; label = own positive."""
    q, p = q.astype(np.float64), p.astype(np.float64)
    docs = [(j, p[j]) for j in range(len(p))]  # (owner, vector); positives first
    if negs is not None:
        docs += [(j, negs[j, k].astype(np.float64)) for j in range(len(p)) for k in range(negs.shape[1])]
    losses, correct, pos, neg = [], [], [], []
    for i in range(len(q)):
        s_pos = q[i] @ p[i]
        others = [q[i] @ d for idx, (j, d) in enumerate(docs) if idx != i]
        losses.append(_lse([s_pos / tau] + [s / tau for s in others]) - s_pos / tau)
        correct.append(all(s_pos > s for s in others))
        pos.append(s_pos)
        neg += others
    metrics = {"accuracy": np.mean(correct), "pos_sim": np.mean(pos), "neg_sim": np.mean(neg) if neg else 0.0}
    if negs is not None:
        metrics["hard_neg_sim"] = np.mean([q[i] @ negs[i, k] for i in range(len(q)) for k in range(negs.shape[1])])
    return np.mean(losses), metrics


def ref_gte(q, p, negs, tau):
    """GTE: Z_i over q->d (all docs), q->q (j != i), d->q (all j), d->d (docs not of query i)."""
    q, p = q.astype(np.float64), p.astype(np.float64)
    batch = len(q)
    docs = [(j, p[j]) for j in range(batch)]
    if negs is not None:
        docs += [(j, negs[j, k].astype(np.float64)) for j in range(batch) for k in range(negs.shape[1])]
    losses, correct, pos, neg = [], [], [], []
    for i in range(batch):
        s_pos = q[i] @ p[i]
        q_to_d = [q[i] @ d for idx, (j, d) in enumerate(docs) if idx != i]
        q_to_q = [q[i] @ q[j] for j in range(batch) if j != i]
        d_to_q = [q[j] @ p[i] for j in range(batch) if j != i]  # plus j = i, the positive again
        d_to_d = [d @ p[i] for (j, d) in docs if j != i]
        negatives = q_to_d + q_to_q + d_to_q + d_to_d
        z_terms = [s_pos / tau, s_pos / tau] + [s / tau for s in negatives]
        losses.append(_lse(z_terms) - s_pos / tau)
        correct.append(all(s_pos > s for s in q_to_d))
        pos.append(s_pos)
        neg += negatives
    metrics = {"accuracy": np.mean(correct), "pos_sim": np.mean(pos), "neg_sim": np.mean(neg) if neg else 0.0}
    if negs is not None:
        metrics["hard_neg_sim"] = np.mean([q[i] @ negs[i, k] for i in range(batch) for k in range(negs.shape[1])])
    return np.mean(losses), metrics


def _assert_metrics(got, want):
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == jnp.float32, name
        np.testing.assert_allclose(float(got[name]), value, rtol=RTOL, atol=ATOL, err_msg=name)


# ---------------------------------------------------------------------------------------------
# values and metrics


@pytest.mark.parametrize("batch,block", [(1, 4), (2, 1), (7, 3), (12, 4), (12, 64)])
@pytest.mark.parametrize("tau", [0.02, 0.05, 1.0])
def test_in_batch_matches_numpy(batch, block, tau):
    q, p, _ = make_embeddings(batch, 0)
    loss, metrics = in_batch_softmax_loss(q, p, tau, block_size=block)
    want_loss, want_metrics = ref_softmax(q, p, None, tau)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), want_loss, rtol=RTOL, atol=loss_atol(tau))
    _assert_metrics(metrics, want_metrics)


@pytest.mark.parametrize("num_negs", [1, 3, 7])
@pytest.mark.parametrize("batch,block,tau", [(1, 2, 0.05), (5, 2, 0.02), (9, 4, 0.05), (9, 32, 1.0)])
def test_hard_negative_matches_numpy(num_negs, batch, block, tau):
    q, p, negs = make_embeddings(batch, num_negs)
    loss, metrics = hard_negative_loss(q, p, negs, tau, block_size=block)
    want_loss, want_metrics = ref_softmax(q, p, negs, tau)
    np.testing.assert_allclose(float(loss), want_loss, rtol=RTOL, atol=loss_atol(tau))
    _assert_metrics(metrics, want_metrics)


@pytest.mark.parametrize("num_negs", [0, 1, 3, 7])
@pytest.mark.parametrize("batch,block,tau", [(1, 2, 0.05), (5, 2, 0.02), (9, 4, 0.05), (9, 32, 1.0)])
def test_gte_matches_numpy(num_negs, batch, block, tau):
    q, p, negs = make_embeddings(batch, num_negs)
    loss, metrics = gte_loss(q, p, negs, tau, block_size=block)
    want_loss, want_metrics = ref_gte(q, p, negs, tau)
    np.testing.assert_allclose(float(loss), want_loss, rtol=RTOL, atol=loss_atol(tau))
    _assert_metrics(metrics, want_metrics)


def test_metrics_are_informative():
    """Guards the references themselves: the fixture gives accuracy strictly inside (0, 1)."""
    q, p, negs = make_embeddings(12, 3)
    _, m = hard_negative_loss(q, p, negs, 0.05, block_size=5)
    assert 0.0 < float(m["accuracy"]) < 1.0
    assert float(m["pos_sim"]) > float(m["hard_neg_sim"]) > float(m["neg_sim"])


def test_collapsed_embeddings_give_log_partition_size_and_zero_accuracy():
    """Every embedding equal: all logits tie, so L = log |Z_i| and no positive is strictly on top."""
    batch, k = 6, 3
    v = np.zeros((batch, 8), np.float32)
    v[:, 0] = 1.0
    n = np.repeat(v[:, None], k, axis=1)
    # |Z_i| = q->d B(1+K), GTE adds q->q B-1, d->q B, d->d (B-1)(1+K)
    cases = [
        (in_batch_softmax_loss(v, v, 0.05), batch),
        (hard_negative_loss(v, v, n, 0.05), batch * (1 + k)),
        (gte_loss(v, v, None, 0.05), batch + (batch - 1) + batch + (batch - 1)),
        (gte_loss(v, v, n, 0.05), batch * (1 + k) + (batch - 1) + batch + (batch - 1) * (1 + k)),
    ]
    for (loss, metrics), size in cases:
        np.testing.assert_allclose(float(loss), np.log(size), rtol=RTOL)
        assert float(metrics["accuracy"]) == 0.0


def test_bfloat16_inputs_use_float32_math():
    q, p, negs = make_embeddings(9, 3)
    q16, p16, n16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, p, negs))
    up = lambda x: np.asarray(x.astype(jnp.float32))
    for fn, ref in [(hard_negative_loss, ref_softmax), (gte_loss, ref_gte)]:
        loss, metrics = fn(q16, p16, n16, 0.02, block_size=4)
        assert loss.dtype == jnp.float32
        # the same formula on the bfloat16 values, in float64
        np.testing.assert_allclose(float(loss), ref(up(q16), up(p16), up(n16), 0.02)[0], rtol=RTOL, atol=ATOL)


def test_bfloat16_gradients_are_summed_over_blocks_in_float32():
    """64 blocks add into every candidate's gradient; the sum must not be rounded to bf16 each step.

    Reference: the same loss on the bf16 values upcast to float32. One block (no running sum) sets
    the floor of bf16 rounding; 64 blocks must stay near it (a bf16 running sum is ~1.7x worse).
    """
    q, p, _ = make_embeddings(512, 0)
    q16, p16 = jnp.asarray(q, jnp.bfloat16), jnp.asarray(p, jnp.bfloat16)

    def rel_errors(block):
        fn = lambda a, b: gte_loss(a, b, None, 0.05, block_size=block)[0]
        want = jax.grad(fn, (0, 1))(q16.astype(jnp.float32), p16.astype(jnp.float32))
        got = jax.jit(jax.grad(fn, (0, 1)))(q16, p16)
        assert all(g.dtype == jnp.bfloat16 for g in got)
        return [float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w)) for g, w in zip(got, want)]

    for blocked, single in zip(rel_errors(8), rel_errors(512)):
        assert blocked < 1.25 * single, (blocked, single)


# ---------------------------------------------------------------------------------------------
# gradients


def dense_reference(kind, q, p, negs, tau):
    """Unblocked jnp formula: one [B, N] logits matrix, -inf where an entry is outside Z_i."""
    batch = q.shape[0]
    eye = jnp.eye(batch, dtype=bool)
    docs = p if negs is None else jnp.concatenate([p, negs.reshape(-1, q.shape[1])])
    owner = jnp.arange(docs.shape[0]) % batch if negs is None else jnp.concatenate(
        [jnp.arange(batch), jnp.repeat(jnp.arange(batch), negs.shape[1])]
    )
    blocks = [q @ docs.T]  # q -> d
    if kind == "gte":
        blocks.append(jnp.where(eye, -jnp.inf, q @ q.T))  # q -> q, j != i
        blocks.append((q @ p.T).T)  # d -> q: [i, j] = q_j . p_i
        own = owner[None, :] == jnp.arange(batch)[:, None]
        blocks.append(jnp.where(own, -jnp.inf, p @ docs.T))  # d -> d
    logits = jnp.concatenate(blocks, axis=1) / tau
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.sum(q * p, axis=1) / tau)


LOSSES = {
    "in_batch": lambda q, p, n, tau, bs: in_batch_softmax_loss(q, p, tau, block_size=bs),
    "hard": lambda q, p, n, tau, bs: hard_negative_loss(q, p, n, tau, block_size=bs),
    "gte": lambda q, p, n, tau, bs: gte_loss(q, p, n, tau, block_size=bs),
}
CASES = [("in_batch", 0), ("hard", 1), ("hard", 3), ("gte", 0), ("gte", 3)]


@pytest.mark.parametrize("kind,num_negs", CASES)
@pytest.mark.parametrize("block", [4, 10, 16])  # 10 = 4 + 4 + 2 padded; 10 and 16 >= B
def test_grads_match_dense_reference(kind, num_negs, block):
    q, p, negs = make_embeddings(10, num_negs)
    args = (q, p) if negs is None else (q, p, negs)
    argnums = tuple(range(len(args)))
    tau = 0.05

    def ours(*a):
        return LOSSES[kind](a[0], a[1], a[2] if len(a) > 2 else None, tau, block)[0]

    def dense(*a):
        return dense_reference("gte" if kind == "gte" else "softmax", a[0], a[1], a[2] if len(a) > 2 else None, tau)

    loss, grads = jax.jit(jax.value_and_grad(ours, argnums))(*args)
    want_loss, want_grads = jax.value_and_grad(dense, argnums)(*args)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
    for g, w in zip(grads, want_grads):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind,num_negs", CASES)
def test_grads_match_finite_differences(kind, num_negs):
    """Directional derivative along a random direction vs central differences of the float64 formula."""
    q, p, negs = make_embeddings(7, num_negs, dim=8, seed=1)
    args = [q, p] + ([] if negs is None else [negs])
    tau = 0.1
    ref = ref_gte if kind == "gte" else ref_softmax
    rng = np.random.default_rng(2)
    dirs = [rng.normal(size=a.shape) for a in args]

    def ref_at(eps):
        moved = [a.astype(np.float64) + eps * d for a, d in zip(args, dirs)]
        return ref(moved[0], moved[1], moved[2] if len(moved) > 2 else None, tau)[0]

    eps = 1e-5
    fd = (ref_at(eps) - ref_at(-eps)) / (2 * eps)
    grads = jax.grad(
        lambda *a: LOSSES[kind](a[0], a[1], a[2] if len(a) > 2 else None, tau, 3)[0],
        tuple(range(len(args))),
    )(*args)
    analytic = sum(float(np.sum(np.asarray(g, np.float64) * d)) for g, d in zip(grads, dirs))
    np.testing.assert_allclose(analytic, fd, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# sentence-transformers


def _st_loss(embeddings, tau, **kwargs):
    """sentence-transformers' MultipleNegativesRankingLoss on given embedding columns."""
    pytest.importorskip("sentence_transformers", minversion="5.3")
    torch = pytest.importorskip("torch")
    try:
        from sentence_transformers.sentence_transformer.losses import (
            MultipleNegativesRankingLoss,
        )
    except ImportError:  # 5.x layout
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    class GivenEmbeddings(torch.nn.Module):
        """Stands in for the model: returns the embedding stored in each feature dict."""

        def forward(self, features):
            return {"sentence_embedding": features["embedding"]}

    loss = MultipleNegativesRankingLoss(GivenEmbeddings(), scale=1.0 / tau, **kwargs)
    features = [{"embedding": torch.tensor(np.asarray(e, np.float32))} for e in embeddings]
    with torch.no_grad():
        return float(loss(features, None))


GTE_DIRECTIONS = dict(
    directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
    partition_mode="joint",
)


@pytest.mark.parametrize("num_negs", [0, 1, 3])
@pytest.mark.parametrize("tau", [0.02, 0.05])
def test_gte_matches_sentence_transformers(num_negs, tau):
    q, p, negs = make_embeddings(11, num_negs, dim=32)
    # ST takes hard negatives as extra columns: column k holds the k-th negative of every query
    columns = [q, p] + [negs[:, k] for k in range(num_negs)]
    want = _st_loss(columns, tau, **GTE_DIRECTIONS)
    got = gte_loss(q, p, negs, tau, block_size=4)[0]
    np.testing.assert_allclose(float(got), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("tau", [0.02, 0.05])
def test_in_batch_matches_sentence_transformers(tau):
    q, p, _ = make_embeddings(11, 0, dim=32)
    want = _st_loss([q, p], tau)  # default directions=("query_to_doc",)
    np.testing.assert_allclose(float(in_batch_softmax_loss(q, p, tau, block_size=4)[0]), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("num_negs", [1, 3, 7])
def test_hard_negative_matches_sentence_transformers(num_negs):
    q, p, negs = make_embeddings(11, num_negs, dim=32)
    want = _st_loss([q, p] + [negs[:, k] for k in range(num_negs)], 0.05)
    got = hard_negative_loss(q, p, negs, 0.05, block_size=4)[0]
    np.testing.assert_allclose(float(got), want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# sharding and memory


@pytest.mark.parametrize("kind,num_negs", [("in_batch", 0), ("hard", 3), ("gte", 3)])
@pytest.mark.parametrize("block", [6, 32])  # 16 = 6 + 6 + 4 padded; 32 >= B
def test_sharded_matches_single_device(kind, num_negs, block):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    q, p, negs = make_embeddings(16, num_negs)
    args = (q, p) if negs is None else (q, p, negs)
    argnums = tuple(range(len(args)))
    fn = lambda *a: LOSSES[kind](a[0], a[1], a[2] if len(a) > 2 else None, 0.05, block)[0]

    single = jax.device_put(args, jax.devices()[0])
    want_loss, want_grads = jax.jit(jax.value_and_grad(fn, argnums))(*single)

    sharded = jax.device_put(args, NamedSharding(mesh, P("data")))
    loss, grads = jax.jit(jax.value_and_grad(fn, argnums))(*sharded)
    assert len(loss.sharding.device_set) == 8
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


MEM_B, MEM_D, MEM_BLOCK = 4096, 64, 256


@pytest.mark.parametrize(
    "kind,num_negs,columns_per_b",  # logits columns per query: q->d (1+K); GTE adds B + B + B(1+K)
    [("in_batch", 0, 1), ("hard", 3, 4), ("gte", 0, 4), ("gte", 3, 10)],
)
def test_blocking_bounds_temp_memory(kind, num_negs, columns_per_b):
    """jit(grad) with block 256 of B = 4096 must not hold a dense logits matrix, forward or backward."""
    vec = jax.ShapeDtypeStruct((MEM_B, MEM_D), jnp.float32)
    args = [vec, vec] + ([jax.ShapeDtypeStruct((MEM_B, num_negs, MEM_D), jnp.float32)] if num_negs else [])
    fn = lambda *a: LOSSES[kind](a[0], a[1], a[2] if len(a) > 2 else None, 0.05, MEM_BLOCK)[0]
    compiled = jax.jit(jax.grad(fn, tuple(range(len(args))))).lower(*args).compile()
    analysis = compiled.memory_analysis()
    if analysis is None or getattr(analysis, "temp_size_in_bytes", None) is None:
        pytest.skip("memory_analysis not available on this backend")
    dense_bytes = MEM_B * MEM_B * columns_per_b * 4  # one dense float32 logits matrix of this loss
    # one block's logits are dense_bytes / 16; saving every block's logits for backward costs > dense
    assert analysis.temp_size_in_bytes < dense_bytes / 4, (analysis.temp_size_in_bytes, dense_bytes)


def test_sharded_work_is_split_across_devices():
    """Per-device flops on an 8-device mesh are about 1/8 of one device's (no replicated blocks)."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shape = (1024, 32)
    fn = lambda q, p: gte_loss(q, p, None, 0.05, block_size=128)[0]

    def flops(sharding):
        spec = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
        cost = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(spec, spec).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if not cost or "flops" not in cost:
            pytest.skip("cost_analysis has no flops on this backend")
        return cost["flops"]

    single = flops(jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    per_device = flops(NamedSharding(mesh, P("data")))
    assert per_device < single / 4, (per_device, single)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_naming_the_tensor():
    q, p, negs = make_embeddings(4, 3)
    with pytest.raises(ValueError, match=r"p_bd.*\(3, 16\)"):
        in_batch_softmax_loss(q, p[:3], 0.05)
    with pytest.raises(ValueError, match=r"q_bd.*\(64,\)"):
        in_batch_softmax_loss(q.reshape(-1), p.reshape(-1), 0.05)
    with pytest.raises(ValueError, match=r"negs_bkd.*3-D.*\(12, 16\)"):
        hard_negative_loss(q, p, negs.reshape(12, 16), 0.05)
    with pytest.raises(ValueError, match=r"negs_bkd.*\(4, 0, 16\)"):
        hard_negative_loss(q, p, negs[:, :0], 0.05)
    with pytest.raises(ValueError, match=r"negs_bkd.*\(3, 3, 16\)"):
        gte_loss(q, p, negs[:3], 0.05)
    with pytest.raises(ValueError, match=r"negs_bkd.*\(4, 3, 8\)"):
        gte_loss(q, p, negs[:, :, :8], 0.05)
    for tau in (0.0, -0.05, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            gte_loss(q, p, None, tau)
    with pytest.raises(ValueError, match="temperature"):
        jax.jit(lambda t: in_batch_softmax_loss(q, p, t)[0])(0.05)
    with pytest.raises(ValueError, match="block_size"):
        in_batch_softmax_loss(q, p, 0.05, block_size=0)
    with pytest.raises(ValueError, match=r"q_bd.*int32"):
        in_batch_softmax_loss(np.ones((4, 16), np.int32), p, 0.05)

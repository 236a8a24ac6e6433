"""The Matryoshka wrapper against sentence-transformers' MatryoshkaLoss wrapping the matching loss.

Same raw (unnormalised) embeddings on both sides: sentence-transformers truncates and normalises
them (its ``shrink``) before the wrapped loss; ours does the same in ``truncate``. Values and torch
autograd gradients (float64) with respect to the full embeddings; piccolo v2's equal-weight mean
against the float64 formula; a single device for the 8-device runs.
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
from piccolo_jax.losses.matryoshka import matryoshka, matryoshka_loss, truncate
from piccolo_jax.losses.task_losses import (
    cosent_loss,
    distill_kl_loss,
    own_negatives_loss,
)

torch = pytest.importorskip("torch")
st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")

DIM = 24
DIMS = (24, 12, 6)
RTOL, ATOL = 1e-5, 1e-6


def raw(batch, num_negs, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, DIM)) * rng.uniform(0.5, 2.0, size=(batch, 1))
    p = q + 0.9 * rng.normal(size=(batch, DIM))
    negs = q[:, None, :] + 1.1 * rng.normal(size=(batch, max(num_negs, 1), DIM))
    return q.astype(np.float32), p.astype(np.float32), negs[:, :num_negs].astype(np.float32)


class GivenEmbeddings(torch.nn.Module):
    """Stands in for the model: returns the embedding stored in each feature dict."""

    def get_embedding_dimension(self):
        return DIM

    def _get_untruncated_embedding_dimension(self):  # sentence-transformers >= 6.3 asks for this one
        return DIM

    def forward(self, features):
        return {"sentence_embedding": features["embedding"]}


def st_matryoshka(make_loss, columns, labels, weights):
    """MatryoshkaLoss(model, make_loss(model), DIMS, weights) on the given columns; value, grads."""
    model = GivenEmbeddings()
    loss_fn = st_losses.MatryoshkaLoss(model, make_loss(model), list(DIMS), weights)
    leaves = [torch.tensor(np.asarray(c, np.float64), requires_grad=True) for c in columns]
    loss = loss_fn([{"embedding": x} for x in leaves], labels)
    loss.backward()
    return loss.item(), [x.grad.numpy() for x in leaves]


def assert_grads_close(got, want, rtol=1e-5):
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.max(np.abs(w)) + 1e-9)


WEIGHTS = [None, [1.0, 0.5, 0.25]]


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("num_negs,gte", [(0, False), (2, False), (2, True)])
def test_contrastive_matches_sentence_transformers(weights, num_negs, gte):
    tau = 0.05
    q, p, negs = raw(10, num_negs, seed=1)
    kwargs = dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
                  partition_mode="joint") if gte else {}
    make = lambda m: st_losses.MultipleNegativesRankingLoss(m, scale=1.0 / tau, **kwargs)
    # sentence-transformers takes hard negatives as columns: column k = the k-th negative of every query
    columns = [q, p] + [negs[:, k] for k in range(num_negs)]
    want, want_grads = st_matryoshka(make, columns, None, weights)

    if gte:
        fn = lambda q, p, n: gte_loss(q, p, n, tau, block_size=4)
    elif num_negs:
        fn = lambda q, p, n: hard_negative_loss(q, p, n, tau, block_size=4)
    else:
        fn = lambda q, p, n: in_batch_softmax_loss(q, p, tau, block_size=4)
    wrapped = matryoshka(fn, DIMS, weights)
    if num_negs:
        args, objective = (q, p, negs), wrapped
    else:
        args, objective = (q, p), lambda q, p: wrapped(q, p, None)
    (loss, metrics), grads = jax.jit(
        jax.value_and_grad(objective, tuple(range(len(args))), has_aux=True))(*args)
    np.testing.assert_allclose(float(loss), want, rtol=RTOL, atol=ATOL)
    if num_negs:  # the k-th negative column's gradient is negs[:, k]'s
        grads = [grads[0], grads[1]] + [grads[2][:, k] for k in range(num_negs)]
    assert_grads_close(grads, want_grads)
    assert {f"dim_{d}/loss" for d in DIMS} <= set(metrics) and "accuracy" in metrics
    assert float(metrics["accuracy"]) == float(metrics["dim_24/accuracy"])


@pytest.mark.parametrize("weights", WEIGHTS)
def test_cosent_matches_sentence_transformers(weights):
    a, b, _ = raw(16, 0, seed=2)
    labels = np.random.default_rng(3).integers(0, 6, size=16).astype(np.float32)
    want, want_grads = st_matryoshka(lambda m: st_losses.CoSENTLoss(m), [a, b],
                                     torch.tensor(np.float64(labels)), weights)
    fn = lambda a, b: matryoshka_loss(lambda x, y: cosent_loss(x, y, labels, 0.05), (a, b), DIMS, weights)[0]
    loss, grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(a, b)
    np.testing.assert_allclose(float(loss), want, rtol=RTOL, atol=1e-5)
    assert_grads_close(grads, want_grads)


def test_distill_matches_sentence_transformers():
    tau = 0.05
    q, p, negs = raw(10, 3, seed=4)
    scores = np.random.default_rng(5).normal(size=(10, 4)).astype(np.float32) * 3
    make = lambda m: st_losses.DistillKLDivLoss(m, temperature=tau)  # student and teacher both tau
    want, want_grads = st_matryoshka(make, [q, p] + [negs[:, k] for k in range(3)],
                                     torch.tensor(np.float64(scores)), [1.0, 0.5, 0.25])
    fn = lambda *e: matryoshka_loss(lambda q, p, n: distill_kl_loss(q, p, n, scores, tau, teacher_temperature=tau),
                                    e, DIMS,
                                    [1.0, 0.5, 0.25])[0]
    loss, grads = jax.jit(jax.value_and_grad(fn, (0, 1, 2)))(q, p, negs)
    # DistillKLDivLoss rescales by the temperature squared (see distill_kl_loss)
    np.testing.assert_allclose(tau**2 * float(loss), want, rtol=RTOL, atol=1e-8)
    assert_grads_close([tau**2 * g for g in [grads[0], grads[1]] + [grads[2][:, k] for k in range(3)]],
                       want_grads)


def test_own_negatives_equal_weight_mean_is_piccolo_v2():
    """piccolo v2: sum over its dims of ClsContrastLoss / len(dims), in float64 against ours."""
    q, p, negs = raw(8, 3, seed=6)
    tau = 0.05

    def ref(dim):
        unit = lambda x: x[..., :dim] / np.linalg.norm(x[..., :dim], axis=-1, keepdims=True)
        uq, up, un = (unit(np.float64(x)) for x in (q, p, negs))
        logits = np.concatenate([np.sum(uq * up, 1)[:, None], np.einsum("bd,bkd->bk", uq, un)], 1) / tau
        m = logits.max(1, keepdims=True)
        return np.mean(np.log(np.exp(logits - m).sum(1)) + m[:, 0] - logits[:, 0])

    want = sum(ref(d) for d in DIMS) / len(DIMS)
    loss, _ = matryoshka(lambda q, p, n: own_negatives_loss(q, p, n, tau), DIMS, [1 / 3] * 3)(q, p, negs)
    np.testing.assert_allclose(float(loss), want, rtol=RTOL)


def test_truncate_renormalises_and_keeps_dtype():
    q, _, _ = raw(5, 0, seed=7)
    t = truncate(jnp.asarray(q), 6)
    np.testing.assert_allclose(t, q[:, :6] / np.linalg.norm(q[:, :6], axis=1, keepdims=True), rtol=1e-6)
    assert truncate(jnp.asarray(q, jnp.bfloat16), 6).dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(truncate(jnp.zeros((2, 8)), 4)))) == 0.0  # no NaN on a zero vector


def test_sharded_matches_single_device():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    q, p, negs = raw(16, 2, seed=8)
    fn = lambda q, p, n: matryoshka(lambda *e: gte_loss(*e, 0.05, block_size=6), DIMS, [1.0, 0.5, 0.25])(
        q, p, n)[0]
    vg = jax.jit(jax.value_and_grad(fn, (0, 1, 2)))
    want_loss, want_grads = vg(*jax.device_put((q, p, negs), jax.devices()[0]))
    loss, grads = vg(*jax.device_put((q, p, negs), NamedSharding(mesh, P("data"))))
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
    for g, w in zip(grads, want_grads):
        assert len(g.sharding.device_set) == 8
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_bad_dims_and_weights():
    q, p, _ = raw(4, 0)
    fn = lambda q, p: in_batch_softmax_loss(q, p, 0.05)
    for dims, match in [((), "must not be empty"), ((24, 25), r"ints in \[1, 24\]"), ((0,), r"\[1, 24\]"),
                        ((12, 12), "distinct"), ((12.0,), "ints")]:
        with pytest.raises(ValueError, match=match):
            matryoshka_loss(fn, (q, p), dims)
    with pytest.raises(ValueError, match="as many as the dims"):
        matryoshka_loss(fn, (q, p), (24, 12), [1.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        matryoshka_loss(fn, (q, p), (24, 12), [1.0, -1.0])
    with pytest.raises(ValueError, match="share their last dimension"):
        matryoshka_loss(fn, (q, p[:, :12]), (12,))
    with pytest.raises(ValueError, match="at least one embedding"):
        matryoshka_loss(fn, (None,), (12,))

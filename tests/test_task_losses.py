"""CoSENT, own-negatives, distillation and weighted-sum losses against independent references.

References, all on the same embeddings: sentence-transformers 6 ``CoSENTLoss`` and
``DistillKLDivLoss`` (values and torch autograd gradients, float64); float64 numpy formulas written
out with loops (piccolo v2's CoSENT and classification contrast, FlagEmbedding's distillation);
torch float64 autograd of those formulas for gradients; a single device for the 8-device runs.

Gradients are taken with respect to raw (unnormalised) embeddings on both sides: ours through
``normalise`` then the loss, the references through their own cosine (or torch's F.normalize),
which is how the encoder's pooled output reaches the loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from piccolo_jax.losses.contrastive import hard_negative_loss
from piccolo_jax.losses.task_losses import (
    cosent_loss,
    distill_kl_loss,
    own_negatives_loss,
    weighted_sum,
)

torch = pytest.importorskip("torch")
st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")

RTOL = 1e-5
ATOL = 1e-6


def normalise(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def raw_embeddings(batch, num_negs, dim=16, seed=0):
    """Unnormalised float32 q [B, D], p [B, D], negs [B, K, D]: p and negs are noisy copies of q."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, dim)) * rng.uniform(0.5, 2.0, size=(batch, 1))
    p = q + 0.9 * rng.normal(size=(batch, dim))
    negs = q[:, None, :] + 1.1 * rng.normal(size=(batch, max(num_negs, 1), dim))
    return q.astype(np.float32), p.astype(np.float32), negs[:, :num_negs].astype(np.float32)


def unit64(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def assert_grads_close(got, want, rtol=1e-5):
    """float32 gradients against float64 ones: relative to the largest entry of the reference."""
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape and np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.max(np.abs(w)) + 1e-9)


def torch_leaves(*arrays):
    return [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in arrays]


def sharded_matches_single(fn, args, argnums):
    """jit(value_and_grad(fn)) with args on one device == with args sharded over 8 devices."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    vg = jax.jit(jax.value_and_grad(fn, argnums))
    want_loss, want_grads = vg(*jax.device_put(args, jax.devices()[0]))
    loss, grads = vg(*jax.device_put(args, NamedSharding(mesh, P("data"))))
    assert len(loss.sharding.device_set) == 8
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
    for g, w in zip(grads, want_grads):
        assert len(g.sharding.device_set) == 8
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# CoSENT


def ref_cosent(a, b, labels, tau, unit=True):
    """piccolo v2 / Su's formula over explicit pairs: log(1 + sum_{l_i < l_j} exp((c_i - c_j) / tau)),
    c the cosines (unit=True) or the dot products of the given vectors (unit=False)."""
    a, b = (unit64(a), unit64(b)) if unit else (np.float64(a), np.float64(b))
    cos = np.sum(a * b, axis=1) / tau
    terms = [0.0] + [cos[i] - cos[j] for i in range(len(cos)) for j in range(len(cos)) if labels[i] < labels[j]]
    m = max(terms)
    return m + np.log(sum(np.exp(t - m) for t in terms))


def sts_labels(batch, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    if ties:  # uniem-style integer grades 0..5, many ties
        return rng.integers(0, 6, size=batch).astype(np.float32)
    return rng.uniform(0, 1, size=batch).astype(np.float32)


@pytest.mark.parametrize("batch,ties", [(1, True), (2, False), (9, True), (9, False), (32, True)])
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_cosent_matches_numpy_pairs(batch, ties, tau):
    a, b, _ = raw_embeddings(batch, 0)
    labels = sts_labels(batch, ties=ties)
    loss, metrics = cosent_loss(normalise(a), normalise(b), labels, tau)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), ref_cosent(a, b, labels, tau), rtol=RTOL, atol=4e-7 / tau)
    cos = np.sum(unit64(a) * unit64(b), axis=1)
    np.testing.assert_allclose(float(metrics["mean_sim"]), cos.mean(), rtol=RTOL, atol=ATOL)
    want_r = np.corrcoef(cos, labels)[0, 1] if batch > 1 else 0.0
    np.testing.assert_allclose(float(metrics["pearson"]), want_r, rtol=1e-4, atol=1e-5)


def test_cosent_equal_labels_give_zero_loss_and_gradient():
    a, b, _ = raw_embeddings(6, 0)
    fn = lambda a, b: cosent_loss(normalise(a), normalise(b), np.full(6, 3.0, np.float32))[0]
    loss, grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(a, b)
    assert float(loss) == 0.0 and all(float(jnp.max(jnp.abs(g))) == 0.0 for g in grads)


def st_cosent(a, b, labels, tau):
    """sentence-transformers CoSENTLoss (cosine on raw embeddings), value and autograd gradients."""
    ta, tb = torch_leaves(a, b)
    loss = st_losses.CoSENTLoss(None, scale=1.0 / tau).compute_loss_from_embeddings(
        [ta, tb], torch.tensor(np.asarray(labels, np.float64)))
    loss.backward()
    return loss.item(), (ta.grad.numpy(), tb.grad.numpy())


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("tau", [0.05, 0.1])
def test_cosent_matches_sentence_transformers_values_and_grads(ties, tau):
    a, b, _ = raw_embeddings(24, 0, dim=32, seed=3)
    labels = sts_labels(24, seed=4, ties=ties)
    want, want_grads = st_cosent(a, b, labels, tau)
    fn = lambda a, b: cosent_loss(normalise(a), normalise(b), labels, tau)[0]
    loss, grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(a, b)
    np.testing.assert_allclose(float(loss), want, rtol=RTOL, atol=4e-7 / tau)
    assert_grads_close(grads, want_grads)


def test_cosent_default_scale_is_sentence_transformers_default():
    a, b, _ = raw_embeddings(10, 0, seed=5)
    labels = sts_labels(10, seed=6)
    want, _ = st_cosent(a, b, labels, 1.0 / 20.0)  # CoSENTLoss's scale=20.0 default
    np.testing.assert_allclose(float(cosent_loss(normalise(a), normalise(b), labels)[0]), want, rtol=RTOL)


def test_cosent_sharded_matches_single_device():
    a, b, _ = raw_embeddings(16, 0, seed=7)
    labels = sts_labels(16, seed=8)
    sharded_matches_single(lambda a, b, l: cosent_loss(normalise(a), normalise(b), l)[0], (a, b, labels), (0, 1))


def test_cosent_bfloat16_inputs_use_float32_math():
    a, b, _ = raw_embeddings(12, 0, seed=9)
    a16, b16 = (jnp.asarray(normalise(x), jnp.bfloat16) for x in (a, b))
    labels = sts_labels(12, seed=10)
    loss, _ = cosent_loss(a16, b16, labels)
    assert loss.dtype == jnp.float32
    up = lambda x: np.asarray(x.astype(jnp.float32))
    np.testing.assert_allclose(float(loss), ref_cosent(up(a16), up(b16), labels, 0.05, unit=False),
                               rtol=RTOL, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# own negatives only (piccolo v2 classification contrast)


def ref_own_negatives(q, p, negs, tau):
    """piccolo v2's ClsContrastLoss without its weight, one row at a time, float64."""
    q, p, negs = unit64(q), unit64(p), unit64(negs)
    losses, correct = [], []
    for i in range(len(q)):
        logits = [q[i] @ p[i] / tau] + [q[i] @ n / tau for n in negs[i]]
        m = max(logits)
        losses.append(m + np.log(sum(np.exp(x - m) for x in logits)) - logits[0])
        correct.append(all(logits[0] > x for x in logits[1:]))
    pos = np.mean([q[i] @ p[i] for i in range(len(q))])
    neg = np.mean([q[i] @ n for i in range(len(q)) for n in negs[i]])
    return np.mean(losses), {"accuracy": np.mean(correct), "pos_sim": pos, "neg_sim": neg}


def torch_own_negatives(q, p, negs, tau):
    """The same formula in torch float64: cosines, cross-entropy with label 0; autograd gradients."""
    tq, tp, tn = torch_leaves(q, p, negs)
    cos_pos = torch.nn.functional.cosine_similarity(tq, tp, dim=-1)
    cos_neg = torch.nn.functional.cosine_similarity(tq[:, None, :], tn, dim=-1)
    logits = torch.cat([cos_pos[:, None], cos_neg], dim=1) / tau
    loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    loss.backward()
    return loss.item(), (tq.grad.numpy(), tp.grad.numpy(), tn.grad.numpy())


@pytest.mark.parametrize("batch,num_negs", [(1, 1), (5, 3), (12, 7)])
@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_own_negatives_matches_numpy_and_torch(batch, num_negs, tau):
    q, p, negs = raw_embeddings(batch, num_negs, seed=11)
    want, want_metrics = ref_own_negatives(q, p, negs, tau)
    torch_loss, want_grads = torch_own_negatives(q, p, negs, tau)
    np.testing.assert_allclose(torch_loss, want, rtol=1e-12)
    fn = lambda q, p, n: own_negatives_loss(normalise(q), normalise(p), normalise(n), tau)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, (0, 1, 2), has_aux=True))(q, p, negs)
    np.testing.assert_allclose(float(loss), want, rtol=RTOL, atol=4e-7 / tau)
    assert set(metrics) == set(want_metrics)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=RTOL, atol=ATOL, err_msg=name)
    assert_grads_close(grads, want_grads)


def test_own_negatives_ignores_other_rows():
    """No in-batch negatives: row 0's loss does not move when every other row changes."""
    q, p, negs = raw_embeddings(6, 2, seed=12)
    q2, p2, n2 = raw_embeddings(6, 2, seed=13)
    q2[0], p2[0], n2[0] = q[0], p[0], negs[0]
    one = lambda q, p, n: own_negatives_loss(normalise(q[:1]), normalise(p[:1]), normalise(n[:1]), 0.05)[0]
    full = lambda q, p, n: own_negatives_loss(normalise(q), normalise(p), normalise(n), 0.05)[0]
    rest = lambda q, p, n: own_negatives_loss(normalise(q[1:]), normalise(p[1:]), normalise(n[1:]), 0.05)[0]
    for args in ((q, p, negs), (q2, p2, n2)):
        np.testing.assert_allclose(6 * full(*args), one(*args) + 5 * rest(*args), rtol=RTOL)


def test_own_negatives_sharded_matches_single_device():
    q, p, negs = raw_embeddings(16, 3, seed=14)
    fn = lambda q, p, n: own_negatives_loss(normalise(q), normalise(p), normalise(n), 0.05)[0]
    sharded_matches_single(fn, (q, p, negs), (0, 1, 2))


# ---------------------------------------------------------------------------------------------
# distillation


def teacher_scores(batch, num_negs, seed=0, spread=3.0):
    """Reranker-like scores: the positive usually, not always, highest."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(batch, 1 + num_negs)) * spread
    scores[:, 0] += spread
    return scores.astype(np.float32)


def st_distill(q, p, negs, scores, tau, teacher_tau):
    """sentence-transformers DistillKLDivLoss on F.normalize'd embeddings (its default dot score)."""
    leaves = torch_leaves(q, p, negs)
    unit = [torch.nn.functional.normalize(x, dim=-1) for x in leaves]
    columns = [unit[0], unit[1]] + [unit[2][:, k] for k in range(negs.shape[1])]
    loss_fn = st_losses.DistillKLDivLoss(None, student_temperature=tau, teacher_temperature=teacher_tau)
    loss = loss_fn.compute_loss_from_embeddings(columns, torch.tensor(np.asarray(scores, np.float64)))
    loss.backward()
    return loss.item(), tuple(x.grad.numpy() for x in leaves)


def flag_embedding_kl_div(q, p, negs, scores, tau):
    """FlagEmbedding's kl_div distillation as a formula: -(1/B) sum_i sum_n P_in log Q_in, float64;
    P = softmax(teacher scores), Q = softmax(cos / tau) over the query's own group. Returns
    (value, teacher entropy mean, autograd gradients)."""
    leaves = torch_leaves(q, p, negs)
    tq, tp, tn = [torch.nn.functional.normalize(x, dim=-1) for x in leaves]
    student = torch.cat([torch.sum(tq * tp, -1)[:, None], torch.einsum("bd,bkd->bk", tq, tn)], 1) / tau
    targets = torch.softmax(torch.tensor(np.asarray(scores, np.float64)), dim=-1)
    loss = -torch.mean(torch.sum(torch.log_softmax(student, dim=-1) * targets, dim=-1))
    loss.backward()
    entropy = float(-torch.mean(torch.sum(targets * torch.log(targets), dim=-1)))
    return loss.item(), entropy, tuple(x.grad.numpy() for x in leaves)


def _distill(tau, teacher_tau=1.0, mask=None):
    def fn(q, p, n, scores):
        return distill_kl_loss(normalise(q), normalise(p), normalise(n), scores, tau,
                               teacher_temperature=teacher_tau, mask_b=mask)
    return fn


@pytest.mark.parametrize("num_negs", [1, 3, 7])
@pytest.mark.parametrize("tau,teacher_tau", [(0.05, 1.0), (1.0, 1.0), (0.02, 0.5)])
def test_distill_matches_sentence_transformers(num_negs, tau, teacher_tau):
    q, p, negs = raw_embeddings(10, num_negs, dim=32, seed=15)
    scores = teacher_scores(10, num_negs, seed=16)
    want, want_grads = st_distill(q, p, negs, scores, tau, teacher_tau)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(_distill(tau, teacher_tau), (0, 1, 2), has_aux=True))(
        q, p, negs, scores)
    # sentence-transformers rescales by the student temperature squared
    np.testing.assert_allclose(tau**2 * float(loss), want, rtol=RTOL, atol=1e-7)
    assert float(metrics["kl"]) == float(loss)
    assert_grads_close([tau**2 * np.asarray(g) for g in grads], want_grads)


def test_distill_agreement_is_the_share_of_rows_whose_first_choices_agree():
    """numpy: argmax of the student's cosines over the query's own candidates vs argmax of the teacher's
    scores; teachers here prefer a negative in some rows, so agreeing with candidate 0 is not enough."""
    q, p, negs = raw_embeddings(16, 3, seed=31)
    scores = teacher_scores(16, 3, seed=32, spread=1.0)
    scores[::3, 2] += 10.0  # every third teacher ranks negative 1 (candidate 2) first
    cand = np.concatenate([unit64(p)[:, None], unit64(negs)], axis=1)  # [B, 1 + K, D]
    student_first = np.argmax(np.einsum("bd,bnd->bn", unit64(q), cand), axis=1)
    want = np.mean(student_first == np.argmax(scores, axis=1))
    assert 0 < want < 1 and np.any(np.argmax(scores, axis=1) != 0)
    _, metrics = _distill(0.05)(q, p, negs, scores)
    assert float(metrics["agreement"]) == pytest.approx(want, abs=1e-7)


def test_distill_matches_flag_embedding_up_to_the_teacher_entropy():
    q, p, negs = raw_embeddings(12, 4, seed=17)
    scores = teacher_scores(12, 4, seed=18)
    tau = 0.02  # BGE's temperature
    want, entropy, want_grads = flag_embedding_kl_div(q, p, negs, scores, tau)
    loss, grads = jax.jit(jax.value_and_grad(lambda *a: _distill(tau)(*a)[0], (0, 1, 2)))(q, p, negs, scores)
    np.testing.assert_allclose(float(loss) + entropy, want, rtol=RTOL, atol=2e-7 / tau)
    assert_grads_close(grads, want_grads)


def test_distill_mask_means_over_the_kept_rows_and_teacher_gets_no_gradient():
    q, p, negs = raw_embeddings(8, 2, seed=19)
    scores = teacher_scores(8, 2, seed=20)
    mask = np.array([True, False, True, True, False, False, True, True])
    kept = lambda x: x[mask]
    got = _distill(0.05, mask=jnp.asarray(mask))(q, p, negs, scores)
    want = _distill(0.05)(kept(q), kept(p), kept(negs), kept(scores))
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=RTOL)
    np.testing.assert_allclose(float(got[1]["agreement"]), float(want[1]["agreement"]), rtol=RTOL)
    none = _distill(0.05, mask=jnp.zeros(8, bool))(q, p, negs, scores)
    assert float(none[0]) == 0.0 and float(none[1]["agreement"]) == 0.0
    g_scores = jax.grad(lambda s: _distill(0.05)(q, p, negs, s)[0])(scores)
    assert float(jnp.max(jnp.abs(g_scores))) == 0.0


def test_distill_one_hot_teacher_stays_finite():
    """A teacher softmax that underflows to exact zeros (spread / T >> 100): 0 log 0 = 0, no NaN."""
    q, p, negs = raw_embeddings(6, 3, seed=21)
    scores = teacher_scores(6, 3, seed=22, spread=1e4)
    loss, grads = jax.jit(jax.value_and_grad(lambda *a: _distill(0.05)(*a)[0], (0, 1, 2)))(q, p, negs, scores)
    assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in grads)
    want, _ = st_distill(q, p, negs, scores, 0.05, 1.0)
    np.testing.assert_allclose(0.05**2 * float(loss), want, rtol=RTOL, atol=1e-7)


def test_distill_sharded_matches_single_device():
    q, p, negs = raw_embeddings(16, 3, seed=23)
    scores = teacher_scores(16, 3, seed=24)
    mask = jnp.asarray(np.arange(16) % 5 != 0)
    sharded_matches_single(lambda *a: _distill(0.05, mask=mask)(*a)[0], (q, p, negs, scores), (0, 1, 2))


# ---------------------------------------------------------------------------------------------
# weighted sum


def test_weighted_sum_adds_losses_and_keeps_metrics_per_term():
    q, p, negs = raw_embeddings(8, 3, seed=25)
    scores = teacher_scores(8, 3, seed=26)

    def combined(q, p, n):
        q, p, n = normalise(q), normalise(p), normalise(n)
        return weighted_sum({
            "contrastive": (1.0, hard_negative_loss(q, p, n, 0.02)),
            "distill": (0.5, distill_kl_loss(q, p, n, scores, 0.02)),
            "report_only": (0.0, own_negatives_loss(q, p, n, 0.05)),
        })

    (loss, metrics), grads = jax.jit(jax.value_and_grad(combined, (0, 1, 2), has_aux=True))(q, p, negs)
    parts = [lambda *a: hard_negative_loss(*map(normalise, a), 0.02)[0],
             lambda *a: distill_kl_loss(*map(normalise, a), scores, 0.02)[0]]
    want = parts[0](q, p, negs) + 0.5 * parts[1](q, p, negs)
    np.testing.assert_allclose(float(loss), float(want), rtol=RTOL)
    want_grads = [a + 0.5 * b for a, b in zip(*(jax.jit(jax.grad(f, (0, 1, 2)))(q, p, negs) for f in parts))]
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    assert metrics["distill/loss"] == metrics["distill/kl"]
    assert {"contrastive/accuracy", "contrastive/hard_neg_sim", "report_only/loss", "report_only/neg_sim"} <= set(metrics)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_naming_the_tensor():
    q, p, negs = (normalise(x) for x in raw_embeddings(4, 3))
    scores = teacher_scores(4, 3)
    with pytest.raises(ValueError, match=r"labels_b.*\(4,\).*\(3,\)"):
        cosent_loss(q, p, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"p_bd.*\(3, 16\)"):
        cosent_loss(q, p[:3], np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="temperature"):
        cosent_loss(q, p, np.zeros(4, np.float32), 0.0)
    with pytest.raises(ValueError, match=r"negs_bkd.*\(4, 0, 16\)"):
        own_negatives_loss(q, p, negs[:, :0], 0.05)
    with pytest.raises(ValueError, match=r"teacher_scores_bn.*\(4, 4\).*\(4, 3\)"):
        distill_kl_loss(q, p, negs, scores[:, :3], 0.05)
    with pytest.raises(ValueError, match="teacher_scores_bn.*int32"):
        distill_kl_loss(q, p, negs, scores.astype(np.int32), 0.05)
    with pytest.raises(ValueError, match="temperature"):
        distill_kl_loss(q, p, negs, scores, 0.05, teacher_temperature=-1.0)
    with pytest.raises(ValueError, match="mask_b.*bool"):
        distill_kl_loss(q, p, negs, scores, 0.05, mask_b=np.ones(4, np.int32))
    with pytest.raises(ValueError, match="at least one term"):
        weighted_sum({})
    term = own_negatives_loss(q, p, negs, 0.05)
    with pytest.raises(ValueError, match="'x'.*finite"):
        weighted_sum({"x": (float("nan"), term)})
    with pytest.raises(ValueError, match="'y'.*concrete weight"):
        weighted_sum({"y": term})
    with pytest.raises(ValueError, match="free of '/'"):
        weighted_sum({"a/b": (1.0, term)})

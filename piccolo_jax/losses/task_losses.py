"""Losses for scored pairs, classification and distillation, and the weighted sum of several losses.

Three losses on L2-normalised embeddings of the global batch, each a pure function returning
``(loss, metrics)`` like those of :mod:`piccolo_jax.losses.contrastive`, plus a combinator:

* :func:`cosent_loss`: CoSENT on scored pairs (STS, pair classification); equal to
  sentence-transformers' ``CoSENTLoss(scale=1/tau)`` and to piccolo v2's ``CoSentLoss`` without its
  weight.
* :func:`own_negatives_loss`: the softmax of each query against its own positive and its own K
  negatives only, no in-batch negatives (piccolo v2's ``ClsContrastLoss`` for classification and
  clustering without its weight; FlagEmbedding's loss for datasets without in-batch negatives).
* :func:`distill_kl_loss`: KL(teacher || student) over each query's own 1 + K candidates, the teacher
  being the softmax of teacher (reranker) scores (FlagEmbedding's ``kl_div`` distillation,
  sentence-transformers' ``DistillKLDivLoss``).
* :func:`weighted_sum`: sum_t w_t L_t of several ``(loss, metrics)`` results, metrics kept per term,
  e.g. contrastive + w x distillation, or piccolo v2's per-task weights.

Inputs are already L2-normalised (cosine = dot product), float32 or bfloat16; every similarity is
accumulated in float32. Only the CoSENT loss couples rows of the batch, through a sort of the B
scores (O(B log B) time, O(B) memory, no B x B matrix); the other two are sums of per-row terms, so
under ``jax.jit`` with inputs sharded over the batch each device computes its own rows. The caller
jits; no mesh axis is named here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import jax
import jax.numpy as jnp

from piccolo_jax.losses.checks import (
    check_floating,
    check_negs,
    check_pair,
    check_temperature,
)
from piccolo_jax.losses.contrastive import Metrics


def _check_rows(name: str, x, shape: tuple[int, ...]) -> None:
    if jnp.shape(x) != shape:
        raise ValueError(f"{name} must have shape {shape}, got shape {jnp.shape(x)}")


def _own_candidate_cosines(q_bd, p_bd, negs_bkd) -> jax.Array:
    """[B, 1 + K] cosines of query i with its positive (column 0) and its own K negatives, float32."""
    cos_pos_b = jnp.einsum("bd,bd->b", q_bd, p_bd, preferred_element_type=jnp.float32)
    cos_neg_bk = jnp.einsum("bd,bkd->bk", q_bd, negs_bkd, preferred_element_type=jnp.float32)
    return jnp.concatenate([cos_pos_b[:, None], cos_neg_bk], axis=1)


# ----------------------------------------------------------------------------------------------
# CoSENT


def cosent_loss(
    a_bd: jax.Array,
    b_bd: jax.Array,
    labels_b: jax.Array,
    temperature: float = 0.05,
) -> tuple[jax.Array, Metrics]:
    """CoSENT (Su 2022) on B scored pairs (a_i, b_i, label_i).

    With s_i = cos(a_i, b_i) / tau,

        L = log( 1 + sum_{(i, j): label_i < label_j} exp(s_i - s_j) ),

    the sum over every ordered pair of the global batch whose labels differ (ties add nothing): the
    loss is small when every pair with a higher label has the higher cosine. This is
    sentence-transformers' ``CoSENTLoss(scale=1/tau)`` (default scale 20 = 1 / 0.05) and piccolo v2's
    ``CoSentLoss(temperature=tau)`` divided by its built-in weight 0.04.

    Computed without the B x B matrix: sort the pairs by label; for row i let u(i) be the first
    sorted position whose label exceeds label_i, and T_i = log sum_{k >= u(i)} exp(-s_k) a suffix
    log-sum-exp (``lax.cumlogsumexp`` in reverse; T_i = -inf when no label is higher). Then

        sum_{j: label_j > label_i} exp(s_i - s_j) = exp(s_i + T_i),   L = logsumexp(0, s_1 + T_1, ...).

    B = 32_768 pairs: a sort and a scan over 32_768 floats, instead of 32_768^2 x 4 B = 4 GiB of pairs.

    Args:
      a_bd: [B, D] L2-normalised embeddings of the first texts (float32 or bfloat16).
      b_bd: [B, D] L2-normalised embeddings of the second texts.
      labels_b: [B] similarity labels (any real scale; only their order matters), float or int.
      temperature: tau > 0, a concrete number; piccolo v2 uses 0.05.

    Returns:
      (loss, metrics): float32 scalar loss; ``mean_sim`` the mean cosine of the pairs and ``pearson``
      the Pearson correlation of cosines and labels (0 when either is constant).
    """
    batch, _ = check_pair(a_bd, b_bd)
    _check_rows("labels_b", labels_b, (batch,))
    scale = 1.0 / check_temperature(temperature)
    labels_b = jnp.asarray(labels_b).astype(jnp.float32)

    cos_b = jnp.einsum("bd,bd->b", a_bd, b_bd, preferred_element_type=jnp.float32)
    order_b = jnp.argsort(labels_b, stable=True)
    labels_sorted = labels_b[order_b]
    s_sorted = (cos_b * scale)[order_b]
    first_higher_b = jnp.searchsorted(labels_sorted, labels_sorted, side="right")  # u(i), in [0, B]
    suffix = jax.lax.cumlogsumexp(-s_sorted, axis=0, reverse=True)  # suffix[k] = log sum_{m >= k} exp(-s_m)
    suffix = jnp.concatenate([suffix, jnp.full((1,), -jnp.inf, jnp.float32)])  # position B: empty sum
    terms_b = s_sorted + suffix[first_higher_b]
    loss = jax.nn.logsumexp(jnp.concatenate([jnp.zeros((1,), jnp.float32), terms_b]))

    cos_c, labels_c = cos_b - jnp.mean(cos_b), labels_b - jnp.mean(labels_b)
    norm = jnp.sqrt(jnp.sum(cos_c * cos_c) * jnp.sum(labels_c * labels_c))
    pearson = jnp.where(norm > 0, jnp.sum(cos_c * labels_c) / jnp.where(norm > 0, norm, 1.0), 0.0)
    metrics = {"mean_sim": jnp.mean(cos_b), "pearson": pearson}
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


# ----------------------------------------------------------------------------------------------
# Own negatives only


def own_negatives_loss(
    q_bd: jax.Array,
    p_bd: jax.Array,
    negs_bkd: jax.Array,
    temperature: float,
) -> tuple[jax.Array, Metrics]:
    """Softmax of each query against its own positive and its own K negatives; no in-batch negatives.

        L = -(1/B) sum_i log( exp(s(q_i, p_i)/tau) / (exp(s(q_i, p_i)/tau) + sum_k exp(s(q_i, n_ik)/tau)) )

    piccolo v2's classification / clustering loss (``ClsContrastLoss``, tau 0.05, used there with
    weight 0.2 outside this function): q_i is the text, p_i its label's text and n_ik the texts of
    other labels, so that other rows of the batch, which may share q_i's label, are never negatives.
    Also FlagEmbedding's loss for datasets marked as having no in-batch negatives.

    Args:
      q_bd: [B, D] L2-normalised query (text) embeddings.
      p_bd: [B, D] L2-normalised positives.
      negs_bkd: [B, K, D] L2-normalised negatives, K >= 1; negs_bkd[i] belong to query i only.
      temperature: tau > 0, a concrete number.

    Returns:
      (loss, metrics): ``accuracy`` (positive strictly above the query's K negatives), ``pos_sim``
      (mean s(q_i, p_i)) and ``neg_sim`` (mean s(q_i, n_ik)).
    """
    batch, dim = check_pair(q_bd, p_bd)
    check_negs(negs_bkd, batch, dim)
    scale = 1.0 / check_temperature(temperature)
    cos_bn = _own_candidate_cosines(q_bd, p_bd, negs_bkd)
    loss_b = jax.nn.logsumexp(cos_bn * scale, axis=1) - cos_bn[:, 0] * scale
    metrics = {
        "accuracy": jnp.mean((cos_bn[:, 0] > jnp.max(cos_bn[:, 1:], axis=1)).astype(jnp.float32)),
        "pos_sim": jnp.mean(cos_bn[:, 0]),
        "neg_sim": jnp.mean(cos_bn[:, 1:]),
    }
    return jnp.mean(loss_b), jax.tree.map(jax.lax.stop_gradient, metrics)


# ----------------------------------------------------------------------------------------------
# Distillation


def distill_kl_loss(
    q_bd: jax.Array,
    p_bd: jax.Array,
    negs_bkd: jax.Array,
    teacher_scores_bn: jax.Array,
    temperature: float,
    *,
    teacher_temperature: float = 1.0,
    mask_b: Optional[jax.Array] = None,
) -> tuple[jax.Array, Metrics]:
    """KL divergence from the teacher's distribution over each query's own 1 + K candidates.

    Candidates of query i: n = 0 its positive, n = 1..K its own hard negatives. With the teacher
    scores t_in (e.g. a reranker's, BGE's ``pos_scores`` / ``neg_scores``; no gradient flows to them)

        P_in = softmax_n(t_in / T)                      teacher, T = teacher_temperature
        Q_in = softmax_n(s(q_i, d_in) / tau)             student, tau = temperature
        L = (1/|M|) sum_{i in M} sum_n P_in (log P_in - log Q_in)

    with M the rows where ``mask_b`` is True (all rows by default; a row without teacher scores, say
    one whose negatives were drawn at random, is left out and the mean runs over the others; L = 0
    when M is empty). P log P is taken as 0 where P = 0.

    References on the same candidates:
      * sentence-transformers ``DistillKLDivLoss(student_temperature=tau, teacher_temperature=T)``
        on cosine scores = tau^2 x L (it rescales by the student temperature squared);
      * FlagEmbedding's ``kl_div`` distillation, -(1/B) sum_i sum_n P_in log Q_in with T = 1 and tau
        its contrastive temperature, = L + (1/B) sum_i H(P_i): the same gradient, since the teacher
        entropy H is a constant. FlagEmbedding adds its contrastive loss with weight 1, which is
        ``weighted_sum({"contrastive": (1.0, ...), "distill": (1.0, distill_kl_loss(...))})``.

    Args:
      q_bd: [B, D] L2-normalised query embeddings.
      p_bd: [B, D] L2-normalised positives.
      negs_bkd: [B, K, D] L2-normalised hard negatives, K >= 1 (one candidate only gives L = 0).
      teacher_scores_bn: [B, 1 + K] teacher scores, column 0 for the positive, column k for
        negs_bkd[:, k - 1]; any floating dtype, used in float32.
      temperature: tau > 0 of the student logits, a concrete number.
      teacher_temperature: T > 0 of the teacher logits, a concrete number.
      mask_b: optional [B] bool, the rows that have teacher scores.

    Returns:
      (loss, metrics): ``kl`` (= loss) and ``agreement``, the fraction of rows in M whose student and
      teacher rank the same candidate first.
    """
    batch, dim = check_pair(q_bd, p_bd)
    num_negs = check_negs(negs_bkd, batch, dim)
    _check_rows("teacher_scores_bn", teacher_scores_bn, (batch, 1 + num_negs))
    check_floating("teacher_scores_bn", teacher_scores_bn)
    scale = 1.0 / check_temperature(temperature)
    teacher_scale = 1.0 / check_temperature(teacher_temperature)
    if mask_b is not None:
        _check_rows("mask_b", mask_b, (batch,))
        if jnp.result_type(mask_b) != jnp.bool_:
            raise ValueError(f"mask_b must be a bool array, got dtype {jnp.result_type(mask_b)}")

    teacher_bn = jax.lax.stop_gradient(jnp.asarray(teacher_scores_bn).astype(jnp.float32)) * teacher_scale
    log_p_bn = jax.nn.log_softmax(teacher_bn, axis=1)
    p_bn = jnp.exp(log_p_bn)
    log_q_bn = jax.nn.log_softmax(_own_candidate_cosines(q_bd, p_bd, negs_bkd) * scale, axis=1)
    # P (log P - log Q), with 0 where P underflows to 0 (log P = -inf there)
    kl_b = jnp.sum(jnp.where(p_bn > 0, p_bn * (log_p_bn - log_q_bn), 0.0), axis=1)
    agree_b = (jnp.argmax(log_q_bn, axis=1) == jnp.argmax(teacher_bn, axis=1)).astype(jnp.float32)
    if mask_b is None:
        loss, agreement = jnp.mean(kl_b), jnp.mean(agree_b)
    else:
        rows = jnp.maximum(jnp.sum(mask_b.astype(jnp.float32)), 1.0)
        loss = jnp.sum(jnp.where(mask_b, kl_b, 0.0)) / rows
        agreement = jnp.sum(jnp.where(mask_b, agree_b, 0.0)) / rows
    return loss, {"kl": jax.lax.stop_gradient(loss), "agreement": jax.lax.stop_gradient(agreement)}


# ----------------------------------------------------------------------------------------------
# Combinator


def weighted_sum(terms: Mapping[str, tuple[float, tuple[jax.Array, Metrics]]]) -> tuple[jax.Array, Metrics]:
    """sum_t w_t L_t over named ``(weight, (loss, metrics))`` terms, e.g.

        weighted_sum({"contrastive": (1.0, hard_negative_loss(q, p, n, 0.02)),
                      "distill": (1.0, distill_kl_loss(q, p, n, scores, 0.02))})

    Returns (loss, metrics) with metrics ``"<name>/<metric>"`` for every metric of every term and
    ``"<name>/loss"`` the term's unweighted loss. Weights are concrete finite numbers (0 is allowed:
    the term is reported but adds nothing to the loss or its gradient).
    """
    if not terms:
        raise ValueError("weighted_sum needs at least one term")
    total, metrics = jnp.zeros((), jnp.float32), {}
    for name, term in terms.items():
        if "/" in name or not name:
            raise ValueError(f"term names must be non-empty and free of '/', got {name!r}")
        try:
            weight, (loss, term_metrics) = term
            weight = float(weight)
        except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as err:
            raise ValueError(f"term {name!r} must be (concrete weight, (loss, metrics)), got {term!r}") from err
        if not math.isfinite(weight):
            raise ValueError(f"term {name!r}: weight must be finite, got {weight}")
        if weight != 0.0:
            total = total + weight * loss.astype(jnp.float32)
        metrics[f"{name}/loss"] = jax.lax.stop_gradient(loss.astype(jnp.float32))
        metrics.update({f"{name}/{key}": value for key, value in term_metrics.items()})
    return total, metrics

"""Contrastive losses on L2-normalised embeddings of the global batch.

Three losses, each a pure function returning ``(loss, metrics)``:

* :func:`in_batch_softmax_loss`: pretraining; query i against the B positives of the batch.
* :func:`hard_negative_loss`: finetuning; query i against the B positives and the B*K hard negatives.
* :func:`gte_loss`: GTE's improved contrastive loss; q->d, q->q, d->q and d->d terms in one
  partition function, matching sentence-transformers' ``MultipleNegativesRankingLoss(directions=(
  "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), partition_mode="joint")``.

Inputs are already L2-normalised (cosine = dot product; nothing is renormalised here), float32 or
bfloat16; every similarity is accumulated in float32 and logits = cosine / temperature.

Memory. The dense logits of piccolo's batch (32_768 queries x 32_768 positives x 4 bytes = 4 GiB; 18x
that for GTE with 7 hard negatives) do not fit, so the rows are processed in blocks of ``block_size``
queries under ``lax.scan``: each block computes its logsumexp against every candidate, and the block
body is wrapped in ``jax.checkpoint`` so that the backward pass recomputes the block's logits instead
of saving them. Forward and backward peak memory are O(block_size x candidates). Every block adds
to every candidate's gradient; those sums run in float32 even for bfloat16 inputs.

Blocks are interleaved: block b holds the rows {b, b + n_blocks, b + 2 n_blocks, ...}. With a batch
sharded contiguously over devices this puts every block's rows on all devices, so each device works on
block_size / n_devices rows per step. Rows padded to fill the last block are masked out of every sum.

The caller jits; inputs may be global ``jax.Array``s sharded over a mesh. No mesh axis is named here.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

DEFAULT_BLOCK_SIZE = 512  # rows per block; GTE, B = 32_768, K = 7: 512 x 32_768 x 18 x 4 B = 1.2 GiB

from piccolo_jax.losses.checks import (
    check_block_size,
    check_negs,
    check_pair,
    check_temperature,
)

Metrics = dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------
# Input checks (shapes are static, so these run at trace time and raise before anything compiles)


# ----------------------------------------------------------------------------------------------
# Blocked computation


def _scores(a_rd, b_cd) -> jax.Array:
    """Cosines [R, C] of row blocks against candidates, accumulated in float32."""
    return jnp.einsum("rd,cd->rc", a_rd, b_cd, preferred_element_type=jnp.float32)


def _logsumexp(pieces_rc: list[jax.Array]) -> jax.Array:
    """Row-wise log of the sum of exp over several [R, C_k] pieces; masked entries hold -inf.

    The shift m is the largest unmasked logit (the positive is always unmasked, so m is finite);
    exp(-inf - m) = 0 has a zero derivative, so masked entries get exactly zero gradient.
    """
    m_r = jax.lax.stop_gradient(
        jnp.max(jnp.stack([jnp.max(x_rc, axis=1) for x_rc in pieces_rc]), axis=0)
    )
    z_r = sum(jnp.sum(jnp.exp(x_rc - m_r[:, None]), axis=1) for x_rc in pieces_rc)
    return m_r + jnp.log(z_r)


def _block_terms(q_rd, d_rd, row_r, valid_r, q_bd, p_bd, n_md, *, num_negs, scale, gte):
    """Loss and metric sums of one block of rows against every candidate of the batch.

    q_rd, d_rd: the block's queries and their positives; row_r: their row indices in the batch;
    valid_r: False on padding rows. n_md: the B*K hard negatives flattened (row j*K + k), or None.
    Returns (loss_sum, correct_count, pos_cos_sum, neg_cos_sum), each summed over the valid rows.
    """
    batch = q_bd.shape[0]
    own_p_rb = jnp.arange(batch)[None, :] == row_r[:, None]  # candidate j == row i
    # Each piece: (cosines [R, C], mask of entries left out of Z_i, mask of entries that are not negatives).
    pieces = []

    # q -> d: every positive and every hard negative of the batch; the positive is column i.
    cos_qp_rb = _scores(q_rd, p_bd)
    pieces.append((cos_qp_rb, None, own_p_rb))
    pos_cos_r = jnp.take_along_axis(cos_qp_rb, row_r[:, None], axis=1)[:, 0]
    other_max_r = jnp.max(jnp.where(own_p_rb, -jnp.inf, cos_qp_rb), axis=1)
    if n_md is not None:
        cos_qn_rm = _scores(q_rd, n_md)
        pieces.append((cos_qn_rm, None, None))
        other_max_r = jnp.maximum(other_max_r, jnp.max(cos_qn_rm, axis=1))
    # top-1 among the q -> d candidates; strict, so a collapsed model (all ties) scores 0
    correct_r = pos_cos_r > other_max_r

    if gte:
        # q -> q: q_i . q_j for j != i
        pieces.append((_scores(q_rd, q_bd), own_p_rb, own_p_rb))
        # d -> q: q_j . d_i for every j, j = i included (the positive pair a second time: it is
        # in Z_i, as in sentence-transformers, but it is not a negative)
        pieces.append((_scores(d_rd, q_bd), None, own_p_rb))
        # d -> d: d_j . d_i for every positive and hard negative d_j of the batch, except the
        # documents of query i itself (its positive and its K hard negatives)
        pieces.append((_scores(d_rd, p_bd), own_p_rb, own_p_rb))
        if n_md is not None:
            owner_m = jnp.arange(n_md.shape[0]) // num_negs  # negative j*K + k belongs to query j
            own_n_rm = owner_m[None, :] == row_r[:, None]
            pieces.append((_scores(d_rd, n_md), own_n_rm, own_n_rm))

    logits = []
    neg_cos_sum_r = jnp.zeros_like(pos_cos_r)
    for cos_rc, out_of_z_rc, not_neg_rc in pieces:
        neg_rc = cos_rc if not_neg_rc is None else jnp.where(not_neg_rc, 0.0, cos_rc)
        neg_cos_sum_r += jnp.sum(neg_rc, axis=1)
        if out_of_z_rc is not None:
            cos_rc = jnp.where(out_of_z_rc, -jnp.inf, cos_rc)
        logits.append(cos_rc * scale)  # logits = cos / tau

    # cross-entropy with the positive as label: -log(exp(s_ii / tau) / Z_i) = log Z_i - s_ii / tau
    loss_r = _logsumexp(logits) - pos_cos_r * scale
    zero = jnp.zeros((), jnp.float32)
    return (
        jnp.sum(jnp.where(valid_r, loss_r, zero)),
        jnp.sum(jnp.where(valid_r, correct_r, False).astype(jnp.float32)),
        jax.lax.stop_gradient(jnp.sum(jnp.where(valid_r, pos_cos_r, zero))),
        jax.lax.stop_gradient(jnp.sum(jnp.where(valid_r, neg_cos_sum_r, zero))),
    )


def _to_blocks(x_bf, n_blocks: int, block: int) -> jax.Array:
    """[B, ...] -> [n_blocks, block, ...] with block b = rows {b, b + n_blocks, ...}, zero-padded."""
    pad = n_blocks * block - x_bf.shape[0]
    x_bf = jnp.pad(x_bf, [(0, pad)] + [(0, 0)] * (x_bf.ndim - 1))
    # row r * n_blocks + b -> [r, b] -> [b, r]
    return jnp.swapaxes(x_bf.reshape((block, n_blocks) + x_bf.shape[1:]), 0, 1)


def _contrastive(q_bd, p_bd, negs_bkd, temperature: float, block_size: int, *, gte: bool):
    """Blocked loss shared by the three public functions; see the module docstring."""
    batch = q_bd.shape[0]
    num_negs = 0 if negs_bkd is None else negs_bkd.shape[1]
    n_md = None if negs_bkd is None else negs_bkd.reshape(batch * num_negs, negs_bkd.shape[2])
    scale = 1.0 / temperature

    block = min(block_size, batch)
    n_blocks = -(-batch // block)  # ceil
    row_b = jnp.arange(n_blocks * block, dtype=jnp.int32)
    xs = (
        _to_blocks(q_bd, n_blocks, block),
        _to_blocks(p_bd, n_blocks, block),
        _to_blocks(row_b, n_blocks, block),  # padding rows get index >= B ...
        _to_blocks(row_b < batch, n_blocks, block),  # ... and valid = False
    )

    # Every block adds to the gradient of every candidate, so the candidates enter the scan as
    # float32 and are cast back to their own dtype inside the block: the per-block cotangents are
    # then summed over the n_blocks steps in float32, not in bfloat16 (the matmuls keep the input
    # dtype; the casts are no-ops for float32 inputs).
    candidates = jax.tree.map(lambda x: x.astype(jnp.float32), (q_bd, p_bd, n_md))
    dtypes = jax.tree.map(lambda x: x.dtype, (q_bd, p_bd, n_md))

    # Rematerialised in backward: only the block's inputs are saved, never its logits.
    @jax.checkpoint
    def block_fn(q_rd, d_rd, row_r, valid_r, candidates_f32):
        q_all, p_all, n_all = jax.tree.map(lambda x, t: x.astype(t), candidates_f32, dtypes)
        return _block_terms(
            q_rd, d_rd, row_r, valid_r, q_all, p_all, n_all,
            num_negs=num_negs, scale=scale, gte=gte,
        )

    def step(carry, x):
        sums = block_fn(*x, candidates)
        return jax.tree.map(jnp.add, carry, sums), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct, pos_sum, neg_sum), _ = jax.lax.scan(step, (zero,) * 4, xs)

    # negatives per query in Z_i: q->d B-1+BK; GTE adds q->q B-1, d->q B-1, d->d (B-1)+(BK-K)
    negs_per_row = (batch - 1) + batch * num_negs
    if gte:
        negs_per_row += 3 * (batch - 1) + (batch - 1) * num_negs
    metrics = {
        "accuracy": correct / batch,
        "pos_sim": pos_sum / batch,
        "neg_sim": neg_sum / max(batch * negs_per_row, 1),
    }
    if negs_bkd is not None:
        # cosine of q_i with its own K hard negatives
        cos_qk_bk = jnp.einsum("bd,bkd->bk", q_bd, negs_bkd, preferred_element_type=jnp.float32)
        metrics["hard_neg_sim"] = jax.lax.stop_gradient(jnp.mean(cos_qk_bk))
    return loss_sum / batch, metrics


# ----------------------------------------------------------------------------------------------
# Public API


def in_batch_softmax_loss(
    q_bd: jax.Array,
    p_bd: jax.Array,
    temperature: float,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[jax.Array, Metrics]:
    """In-batch-negative softmax loss (piccolo pretraining, InfoNCE).

    L = -(1/B) sum_i log( exp(s(q_i, p_i)/tau) / sum_j exp(s(q_i, p_j)/tau) ), j over the B
    positives of the global batch. Equal to sentence-transformers' default
    ``MultipleNegativesRankingLoss(scale=1/tau)`` on (anchor, positive) pairs.

    Args:
      q_bd: [B, D] L2-normalised query embeddings (float32 or bfloat16).
      p_bd: [B, D] L2-normalised positive embeddings; p_bd[i] is the positive of q_bd[i].
      temperature: tau > 0, a concrete number; logits = cosine / tau.
      block_size: queries per block; peak memory is O(block_size x B). Any value gives the same result.

    Returns:
      (loss, metrics): float32 scalar loss; metrics of float32 scalars: ``accuracy`` (fraction of
      queries whose positive scores strictly above every other candidate), ``pos_sim`` (mean
      s(q_i, p_i)), ``neg_sim`` (mean s(q_i, p_j), j != i).
    """
    check_pair(q_bd, p_bd)
    return _contrastive(
        q_bd, p_bd, None, check_temperature(temperature), check_block_size(block_size), gte=False
    )


def hard_negative_loss(
    q_bd: jax.Array,
    p_bd: jax.Array,
    negs_bkd: jax.Array,
    temperature: float,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[jax.Array, Metrics]:
    """Softmax loss over in-batch positives and every hard negative of the batch (finetuning).

    L = -(1/B) sum_i log( exp(s(q_i,p_i)/tau) / (sum_j exp(s(q_i,p_j)/tau) + sum_{j,k} exp(s(q_i,n_jk)/tau)) ):
    each query is scored against all B positives and all B*K hard negatives (its own and every
    other query's). Equal to sentence-transformers' default ``MultipleNegativesRankingLoss`` on
    (anchor, positive, negative_1, ..., negative_K) columns.

    Args:
      q_bd: [B, D] L2-normalised query embeddings.
      p_bd: [B, D] L2-normalised positives.
      negs_bkd: [B, K, D] L2-normalised hard negatives, K >= 1; negs_bkd[i] belong to query i.
      temperature: tau > 0, a concrete number.
      block_size: queries per block; peak memory is O(block_size x B (1 + K)).

    Returns:
      (loss, metrics): as :func:`in_batch_softmax_loss`, with ``accuracy`` over the B + B*K
      candidates, ``neg_sim`` the mean over the B - 1 + B*K negatives of each query, and
      ``hard_neg_sim`` the mean s(q_i, n_ik) over each query's own hard negatives.
    """
    batch, dim = check_pair(q_bd, p_bd)
    check_negs(negs_bkd, batch, dim)
    return _contrastive(
        q_bd, p_bd, negs_bkd, check_temperature(temperature), check_block_size(block_size),
        gte=False,
    )


def gte_loss(
    q_bd: jax.Array,
    p_bd: jax.Array,
    negs_bkd: Optional[jax.Array],
    temperature: float,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[jax.Array, Metrics]:
    """GTE improved contrastive loss (Li et al. 2023), one partition function over four directions.

    L = -(1/B) sum_i [ s(q_i, d_i)/tau - log Z_i ] with, d ranging over every positive and hard
    negative of the batch and d_i the positive of query i,

      Z_i = sum_d exp(s(q_i, d)/tau)                          q -> d: B + B*K terms
          + sum_{j != i} exp(s(q_i, q_j)/tau)                  q -> q: B - 1
          + sum_j exp(s(q_j, d_i)/tau)                         d -> q: B (j = i included)
          + sum_{d not of query i} exp(s(d, d_i)/tau)          d -> d: (B - 1)(1 + K)

    This is exactly sentence-transformers' ``MultipleNegativesRankingLoss(scale=1/tau, directions=
    ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), partition_mode="joint")``:
    hard negatives are documents only (never rows of Z, never in q -> q or d -> q); the d -> d row
    is the positive d_i only, against every positive and hard negative of the batch, leaving out
    all documents that belong to query i (its positive and its own hard negatives); and the d -> q
    term keeps j = i, so s(q_i, d_i) enters Z_i twice. This agrees with the formula in the design
    notes, which also sums d -> q over all j.

    Args:
      q_bd: [B, D] L2-normalised query embeddings.
      p_bd: [B, D] L2-normalised positives.
      negs_bkd: [B, K, D] L2-normalised hard negatives (K >= 1), or None for pairs only.
      temperature: tau > 0, a concrete number.
      block_size: queries per block; peak memory is O(block_size x B (4 + 2K)).

    Returns:
      (loss, metrics): ``accuracy`` is top-1 retrieval over the q -> d candidates; ``pos_sim`` the
      mean s(q_i, d_i); ``neg_sim`` the mean cosine of every negative entry of Z_i over all four
      directions (the second copy of the positive pair in d -> q is not a negative); with hard
      negatives also ``hard_neg_sim``.
    """
    batch, dim = check_pair(q_bd, p_bd)
    if negs_bkd is not None:
        check_negs(negs_bkd, batch, dim)
    return _contrastive(
        q_bd, p_bd, negs_bkd, check_temperature(temperature), check_block_size(block_size),
        gte=True,
    )

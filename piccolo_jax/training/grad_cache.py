"""Exact gradients of a global-batch contrastive loss, computed in chunks (GradCache, Gao et al. 2021).

Pass one encodes every chunk without keeping activations; the loss and its gradient with respect to all
embeddings of the global batch are computed at once; pass two re-encodes chunk by chunk and
back-propagates the cached embedding gradients into the parameters:

    dL/dθ = Σ_chunks  (∂e_chunk/∂θ)ᵀ · dL/de_chunk

This is the gradient of the full-batch loss (every query still sees every passage as a negative), not
gradient accumulation. Activation memory is that of one chunk: 32_768 = 16 chunks x 2_048 rows.

Chunks are interleaved over the data-parallel shards: with the batch split contiguously over S shards,
view it as [S, C, m] (m = B / (S * C)) and let chunk c be rows [:, c, :]. Every chunk then holds m rows
of every shard, so all devices work on every chunk and no rows move between devices.

Dropout is made chunk-invariant by keying every row with its global index (`model.row_keys`): a row gets
the same masks in pass one, in pass two and in an unchunked step (and, since masks follow the token's
position in its text, in the padded and the packed layout: `piccolo_jax.model.dropout`).

Packed batches (`packing.pack_host_batch`: per side [S C R, L] rows, block j = s C + c of R rows holding
global rows [j m, (j + 1) m)) take `packed_loss_and_grads`: the same two passes, with `to_chunks` over the
packed rows (chunk c = block c of every shard), each chunk encoded as [S, R, L] blocks and pooled per
text into [S m, D] rows in `to_chunks` order, so the loss sees exactly the embeddings of the padded step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from piccolo_jax.model.dropout import row_keys

Batch = dict[str, jax.Array]
# encode_fn(params, input_ids [b, T], attention_mask [b, T], dropout_keys [b] | None) -> embeddings [b, D]
EncodeFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]
# loss_fn(q [B, D], p [B, D], negs [B, K, D] | None) -> (loss, metrics)
LossFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, dict]]


def to_chunks(x: jax.Array, shards: int, num_chunks: int) -> jax.Array:
    """[B, ...] -> [C, B / C, ...]; chunk c takes m = B / (S C) rows from each of the S contiguous shards."""
    b = x.shape[0]
    if b % (shards * num_chunks):
        raise ValueError(f"global batch {b} is not divisible by {shards} shards x {num_chunks} chunks")
    m = b // (shards * num_chunks)
    x = x.reshape(shards, num_chunks, m, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(num_chunks, shards * m, *x.shape[3:])


def from_chunks(y: jax.Array, shards: int) -> jax.Array:
    """Inverse of `to_chunks`: [C, S m, ...] -> [B, ...] in the original row order."""
    c, sm = y.shape[:2]
    y = y.reshape(c, shards, sm // shards, *y.shape[2:])
    return jnp.swapaxes(y, 0, 1).reshape(c * sm, *y.shape[3:])


def _towers(batch: Batch) -> tuple[dict, int]:
    """Split the batch into the query tower and the document tower (positives then hard negatives)."""
    k = batch["negative_input_ids"].shape[1] if "negative_input_ids" in batch else 0
    return {"q_ids": batch["query_input_ids"], "q_mask": batch["query_attention_mask"],
            "p_ids": batch["passage_input_ids"], "p_mask": batch["passage_attention_mask"],
            "n_ids": batch.get("negative_input_ids"), "n_mask": batch.get("negative_attention_mask")}, k


def _row_ids(b: int, k: int) -> dict[str, jax.Array]:
    """Global row numbers: queries 0..B-1, positives B..2B-1, negative (i, j) at 2B + i K + j."""
    ids = {"q": jnp.arange(b), "p": b + jnp.arange(b)}
    if k:
        ids["n"] = 2 * b + jnp.arange(b * k).reshape(b, k)
    return ids


def _encode_rows(encode_fn, params, t: dict, rows: dict, key, k: int, constrain=lambda x, axis: x):
    """Embeddings of one set of rows: q [b, D], p [b, D], negs [b, K, D] | None."""
    keys = (lambda r: None) if key is None else (lambda r: row_keys(key, r.reshape(-1)))  # noqa: E731
    q = encode_fn(params, t["q_ids"], t["q_mask"], keys(rows["q"]))
    if not k:
        return q, encode_fn(params, t["p_ids"], t["p_mask"], keys(rows["p"])), None
    b, tp = t["p_ids"].shape
    # Positives and negatives share the passage length: one encoder call over b (1 + K) documents.
    d_ids = jnp.concatenate([t["p_ids"], t["n_ids"].reshape(b * k, tp)])
    d_mask = jnp.concatenate([t["p_mask"], t["n_mask"].reshape(b * k, tp)])
    d_keys = None if key is None else jnp.concatenate([keys(rows["p"]), keys(rows["n"])])
    d_ids, d_mask = constrain(d_ids, 0), constrain(d_mask, 0)
    d_keys = None if d_keys is None else constrain(d_keys, 0)
    d = encode_fn(params, d_ids, d_mask, d_keys)
    return q, d[:b], d[b:].reshape(b, k, -1)


def loss_and_grads(encode_fn: EncodeFn, loss_fn: LossFn, params: Any, batch: Batch, key: jax.Array | None, *,
                   num_chunks: int = 1, shards: int = 1,
                   constrain: Callable[[jax.Array, int], jax.Array] = lambda x, axis: x,
                   local_sum: Callable | None = None,
                   ) -> tuple[jax.Array, dict, Any]:
    """(loss, metrics, dL/dparams) of the global batch; `num_chunks=1` is the plain one-pass step.

    `shards` is the number of data-parallel devices the batch rows are split over; `constrain(x, axis)`
    pins axis `axis` of x to them (see `sharding.row_constraint`). `local_sum` (see
    `sharding.shard_local_sum`), when given, runs pass two on each shard's own rows and reduces the
    parameter gradient once, instead of once per encoder call and chunk.
    """
    towers, k = _towers(batch)
    b = towers["q_ids"].shape[0]
    rows = _row_ids(b, k)

    if num_chunks == 1:
        def total_loss(p):
            q, d, n = _encode_rows(encode_fn, p, towers, rows, key, k, constrain)
            return loss_fn(q, d, n)
        (loss, metrics), grads = jax.value_and_grad(total_loss, has_aux=True)(params)
        return loss, metrics, grads

    # [C, b / C, ...] per tower, each chunk spread over every shard.
    chunk = lambda x: None if x is None else constrain(to_chunks(x, shards, num_chunks), 1)  # noqa: E731
    towers_c = {name: chunk(x) for name, x in towers.items() if x is not None}
    rows_c = {name: chunk(r) for name, r in rows.items()}

    def embed(p, xs, key):
        t, r = xs
        t = {**t, "n_ids": t.get("n_ids"), "n_mask": t.get("n_mask")}
        return _encode_rows(encode_fn, p, t, r, key, k)

    return _two_passes(embed, loss_fn, params, key, (towers_c, rows_c), k, shards, num_chunks, constrain, local_sum)


def _two_passes(embed, loss_fn: LossFn, params: Any, key, inputs_c, k: int, shards: int, num_chunks: int,
                constrain, local_sum) -> tuple[jax.Array, dict, Any]:
    """Gradient caching over chunk-major inputs `inputs_c` ([C, ...] leaves): `embed(params, chunk, key)`
    -> (q, p, negs | None) of one chunk, in chunk row order.

    Pass one embeds every chunk without gradients (lax.map keeps no activations between chunks); the loss
    and dL/d(embeddings) are taken over the whole global batch, back in row order (still split by rows,
    not by the embedding axis, which fsdp shards parameters on); pass two re-encodes each chunk and
    back-propagates its cached gradients, summing over chunks (per shard with `local_sum`: one all-reduce
    of the gradient per step)."""
    q_c, p_c, n_c = jax.lax.map(lambda xs: embed(jax.lax.stop_gradient(params), xs, key), inputs_c)
    q, p = constrain(from_chunks(q_c, shards), 0), constrain(from_chunks(p_c, shards), 0)
    n = constrain(from_chunks(n_c, shards), 0) if k else None

    argnums = (0, 1, 2) if k else (0, 1)
    (loss, metrics), emb_grads = jax.value_and_grad(
        lambda *e: loss_fn(*e) if k else loss_fn(e[0], e[1], None), argnums=argnums, has_aux=True)(q, p, *(
            (n,) if k else ()))
    cached = tuple(constrain(to_chunks(g, shards, num_chunks), 1) for g in emb_grads)

    def pass_two(replicated, chunks):
        p0, key0 = replicated

        def accumulate(acc, xs):
            chunk, g = xs
            _, vjp = jax.vjp(lambda p: embed(p, chunk, key0)[: len(g)], p0)
            (g_params,) = vjp(g)
            return jax.tree.map(jnp.add, acc, g_params), None

        grads, _ = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, p0), chunks)
        return grads

    chunks = (inputs_c, cached)
    grads = pass_two((params, key), chunks) if local_sum is None else local_sum(pass_two, (params, key), chunks)
    return loss, metrics, grads


# ------------------------------------------------------------------------------------------------ packed
# encode_packed_fn(params, ids [n, R, L], positions, segments, num_slots, token keys [n, R, L] | None)
#   -> embeddings [n, num_slots, D]
EncodePackedFn = Callable[..., jax.Array]


def _packed_towers(batch: Batch) -> tuple[dict, int, int]:
    towers = {f"{s[0]}_{f}": batch[f"packed_{s}_{f}"] for s in ("query", "document")
              for f in ("input_ids", "positions", "segments")}
    return towers, batch["packed_query_lengths"].shape[0], batch["packed_document_lengths"].shape[1] - 1


def _encode_packed_rows(encode_packed_fn, params, t: dict, key, b: int, k: int, m: int, rows: tuple[int, int],
                        constrain=lambda x, axis: x):
    """Embeddings q [n m, D], p [n m, D], negs [n m, K, D] | None of the n blocks in chunk arrays `t`
    (per side [n R, L] rows and `*_base` [n R], each row's block's first global row)."""
    def side(s: str, r: int, slots: int, row_of):
        n = t[f"{s}_input_ids"].shape[0] // r
        blocks = {f: constrain(t[f"{s}_{f}"].reshape(n, r, -1), 0) for f in ("input_ids", "positions", "segments")}
        keys = None
        if key is not None:  # each token keyed by its text's global row (grad_cache module doc)
            slot = blocks["segments"] - 1
            base = t[f"{s}_base"].reshape(n, r, 1)
            keys = constrain(row_keys(key, jnp.where(slot >= 0, row_of(base, slot), 0)), 0)
        return encode_packed_fn(params, blocks["input_ids"], blocks["positions"], blocks["segments"], slots, keys)

    q = side("q", rows[0], m, lambda base, slot: base + slot)
    # documents: slot i < m is the positive of row base + i (global row B + base + i); slot m + i K + j is
    # negative j of row base + i (global row 2B + (base + i) K + j = 2B + base K + slot - m)
    d = side("d", rows[1], m * (1 + k),
             lambda base, slot: jnp.where(slot < m, b + base + slot, 2 * b + base * k + slot - m))
    n, dim = q.shape[0], q.shape[-1]
    negs = d[:, m:].reshape(n * m, k, dim) if k else None
    return q.reshape(n * m, dim), d[:, :m].reshape(n * m, dim), negs


def packed_loss_and_grads(encode_packed_fn: EncodePackedFn, loss_fn: LossFn, params: Any, batch: Batch,
                          key: jax.Array | None, *, num_chunks: int = 1, shards: int = 1,
                          constrain: Callable[[jax.Array, int], jax.Array] = lambda x, axis: x,
                          local_sum: Callable | None = None) -> tuple[jax.Array, dict, Any]:
    """`loss_and_grads` of a packed batch (module doc): the same loss, metrics and gradient."""
    towers, b, k = _packed_towers(batch)
    s, c = shards, num_chunks
    if b % (s * c):
        raise ValueError(f"global batch {b} is not divisible by {s} shards x {c} chunks")
    m = b // (s * c)
    rows = tuple(towers[f"{x}_input_ids"].shape[0] // (s * c) for x in ("q", "d"))
    for x, r in zip(("q", "d"), rows):  # the global row of each packed row's block: block j = row // R
        towers[f"{x}_base"] = (jnp.arange(s * c * r, dtype=jnp.int32) // r) * m
    towers_c = {name: constrain(to_chunks(x, s, c), 1) for name, x in towers.items()}

    def embed(p, t, key, constrain=lambda x, axis: x):
        return _encode_packed_rows(encode_packed_fn, p, t, key, b, k, m, rows, constrain)

    if c == 1:
        def total_loss(p):
            q, d, n = embed(p, jax.tree.map(lambda x: x[0], towers_c), key, constrain)
            return loss_fn(q, d, n)
        (loss, metrics), grads = jax.value_and_grad(total_loss, has_aux=True)(params)
        return loss, metrics, grads

    return _two_passes(embed, loss_fn, params, key, towers_c, k, s, c, constrain, local_sum)

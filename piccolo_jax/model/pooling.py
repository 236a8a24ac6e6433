"""Sentence embeddings from token states: mean or [CLS] pooling (padded rows and packed texts), the optional
Dense head, L2 normalisation.

    padded  `pool(h [B, T, D], valid [B, T])`: mean = sum of the valid tokens / their count (>= 1e-9, as
            sentence-transformers), or the [CLS] token
    packed  `pool_segments(h [n, k, D], segments [n, k], positions [n, k], slots)`: the same per text, text j
            of block i being the tokens with segment id j + 1 (one segment_sum per block)
    head    `sentence_head(cfg, e [.., D], (kernel [D, E], bias [E]) | None, normalize)`: e @ kernel + bias in
            float32 (sentence-transformers' Dense with identity activation; piccolo v2's scaling layer), then
            x / max(||x||, 1e-12) (torch.nn.functional.normalize)

Everything here is float32 whatever the encoder's compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from piccolo_jax.config.model import ModelConfig


def pool(h_btd: jax.Array, valid_bt: jax.Array, pooling: str, normalize: bool) -> jax.Array:
    """Sentence embedding [B, D] in float32: mean over valid tokens (sum / count), or [CLS]."""
    h32_btd = h_btd.astype(jnp.float32)
    if pooling == "mean":
        w_bt = valid_bt.astype(jnp.float32)
        count_b1 = jnp.maximum(jnp.sum(w_bt, axis=1, keepdims=True), 1e-9)  # as sentence-transformers
        e_bd = jnp.einsum("btd,bt->bd", h32_btd, w_bt) / count_b1
    elif pooling == "cls":
        e_bd = h32_btd[:, 0]
    else:
        return h32_btd
    return _normalize(e_bd) if normalize else e_bd


def sentence_head(cfg: ModelConfig, e_bd: jax.Array, dense: tuple[jax.Array, jax.Array] | None,
                  normalize: bool) -> jax.Array:
    """Pooled float32 [..., D] -> the sentence embedding: Dense (kernel [D, E], bias [E]) when `dense` is
    given, then L2 normalisation when `normalize` (pooling "none": token states, returned as they are)."""
    if cfg.pooling == "none":
        return e_bd
    if dense is not None:
        kernel, bias = dense
        e_bd = jnp.einsum("...d,de->...e", e_bd.astype(jnp.float32), kernel.astype(jnp.float32),
                          preferred_element_type=jnp.float32) + bias.astype(jnp.float32)
    return _normalize(e_bd) if normalize else e_bd


def dense_of(cfg: ModelConfig, params: dict) -> tuple[jax.Array, jax.Array] | None:
    """(kernel, bias) of the Dense head in a parameter dict, or None without one."""
    return (params["dense"]["kernel"], params["dense"]["bias"]) if cfg.dense_out_features else None


def _normalize(e: jax.Array) -> jax.Array:
    """torch.nn.functional.normalize: x / max(||x||, 1e-12)."""
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def pool_segments(h_nkd: jax.Array, segments_nk: jax.Array, positions_nk: jax.Array, num_slots: int,
                  pooling: str, normalize: bool) -> jax.Array:
    """Per-text embeddings [n, num_slots, D] float32 of blocks of k = R x L packed tokens [n, k, D].

    Slot j of block i is the text whose tokens carry segment id j + 1: mean = segment sum / token count
    (a slot without tokens gives 0), cls = its token at position 0. One scatter-add per block (vmapped,
    so a sharded block axis needs no communication).
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling={pooling!r}: packed texts are pooled per text ('mean' or 'cls')")
    h32 = h_nkd.astype(jnp.float32)
    if pooling == "cls":
        h32 = jnp.where((positions_nk == 0)[..., None], h32, 0.0)
    sums = jax.vmap(lambda h, s: jax.ops.segment_sum(h, s, num_segments=num_slots + 1))(h32, segments_nk)
    e = sums[:, 1:]
    if pooling == "mean":
        ones = (segments_nk > 0).astype(jnp.float32)
        counts = jax.vmap(lambda w, s: jax.ops.segment_sum(w, s, num_segments=num_slots + 1))(ones, segments_nk)
        e = e / jnp.maximum(counts[:, 1:, None], 1e-9)
    return _normalize(e) if normalize else e

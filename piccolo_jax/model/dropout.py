"""Dropout masks that follow the text and the token's position in it, never its place in a tensor.

A text (a global batch row r: queries 0..B-1, positives B..2B-1, negative (i, j) at 2B + iK + j) has the
row key k_r = fold_in(step_key, r). The mask of the token at position t (0 = [CLS]) of that text is drawn
from the token key

    k(r, site, t) = fold_in(fold_in(fold_in(k_r, layer), site), t)       (sites 0, 1, 2 inside a block)
    k(r, emb, t)  = fold_in(fold_in(k_r, 1_000_000), t)                  (dropout after the embeddings)

and is, bit for bit, `jax.random.bernoulli(k, 1 - rate, shape)` with shape (D,) on the hidden sites and
(N, M) on the attention probabilities, of which the token (query) at t takes entry [n, s] for head n and
key position s (M = max_position_embeddings). Padding a text to any length, chunking the batch, sharding
it, or packing several texts into one row therefore draws exactly the same masks for every real token.

For threefry keys (JAX's default, partitionable bits) fold_in and the bits are written out as elementwise
uint32 arithmetic (fold_in(k, d) = threefry2x32(k, (0, d)); bit i of a shape = threefry2x32(k, (0, i)),
i the row-major index), which XLA fuses into the consumer: jax.random's own CPU lowering runs threefry as
a rolled loop over whole arrays, which made dropout masks about 9x as costly. Other key types take
jax.random itself (vmapped), with the same definition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EMBED_SITE = 1_000_000  # distinct from every layer index
SITE_ATTN_PROBS, SITE_ATTN_OUT, SITE_FFN_OUT = 0, 1, 2


def _fast(keys: jax.Array) -> bool:
    return (jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
            and str(jax.random.key_impl(keys)) == "threefry2x32" and jax.config.jax_threefry_partitionable)


def threefry2x32(k0, k1, x0, x1):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), as jax.random computes it, unrolled."""
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def fold(keys: jax.Array, data) -> jax.Array:
    """fold_in(keys, data) elementwise, keys and (int) data broadcast together: a key array of that shape."""
    data = jnp.asarray(data, jnp.uint32) if isinstance(data, int) else jnp.asarray(data)
    shape = jnp.broadcast_shapes(keys.shape, data.shape)
    if _fast(keys):
        kd = jax.random.key_data(keys)
        x1 = jnp.broadcast_to(data.astype(jnp.uint32), shape)
        y0, y1 = threefry2x32(kd[..., 0], kd[..., 1], jnp.zeros_like(x1), x1)
        return jax.random.wrap_key_data(jnp.stack([y0, y1], axis=-1), impl="threefry2x32")
    flat_k = jnp.broadcast_to(keys, shape).reshape(-1)
    flat_d = jnp.broadcast_to(data, shape).reshape(-1)
    return jax.vmap(jax.random.fold_in)(flat_k, flat_d).reshape(shape)


def row_keys(key: jax.Array, rows) -> jax.Array:
    """One dropout key per global row index (any shape of `rows`): fold_in(key, row)."""
    return fold(key, rows)


def _uniform_below(bits1, bits2, p: float) -> jax.Array:
    # jax.random.uniform's float32 construction from 32 random bits, then bernoulli's comparison.
    bits = bits1 ^ bits2
    u = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
    return u < jnp.float32(p)


def keep_hidden(token_keys: jax.Array, p: float, width: int) -> jax.Array:
    """[..., width] booleans: entry [..., d] = jax.random.bernoulli(token_keys[...], p, (width,))[d]."""
    if _fast(token_keys):
        kd = jax.random.key_data(token_keys)[..., None, :]
        counter = jax.lax.broadcasted_iota(jnp.uint32, (*token_keys.shape, width), token_keys.ndim)
        return _uniform_below(*threefry2x32(kd[..., 0], kd[..., 1], jnp.zeros_like(counter), counter), p)
    flat = token_keys.reshape(-1)
    return jax.vmap(lambda k: jax.random.bernoulli(k, p, (width,)))(flat).reshape(*token_keys.shape, width)


def keep_attention(token_keys_bt: jax.Array, key_positions_bs: jax.Array, p: float, num_heads: int,
                   max_positions: int) -> jax.Array:
    """[B, N, T, S] booleans for attention probabilities [B, N, T, S]: entry [b, n, t, s] =
    jax.random.bernoulli(token_keys_bt[b, t], p, (N, M))[n, key_positions_bs[b, s]]."""
    if num_heads * max_positions >= 2 ** 32:
        raise ValueError(f"{num_heads} heads x {max_positions} positions exceed 32-bit dropout counters")
    b, t = token_keys_bt.shape
    s = key_positions_bs.shape[1]
    if _fast(token_keys_bt):
        kd = jax.random.key_data(token_keys_bt)[:, None, :, None, :]  # [B, 1, T, 1, 2]
        heads = jax.lax.broadcasted_iota(jnp.uint32, (b, num_heads, t, s), 1)
        counter = heads * jnp.uint32(max_positions) + key_positions_bs.astype(jnp.uint32)[:, None, None, :]
        return _uniform_below(*threefry2x32(kd[..., 0], kd[..., 1], jnp.zeros_like(counter), counter), p)
    full = jax.vmap(lambda k: jax.random.bernoulli(k, p, (num_heads, max_positions)))(token_keys_bt.reshape(-1))
    full = full.reshape(b, t, num_heads, max_positions)
    idx = jnp.broadcast_to(key_positions_bs[:, None, None, :], (b, t, num_heads, s))
    return jnp.transpose(jnp.take_along_axis(full, idx, axis=3), (0, 2, 1, 3))


def apply(x: jax.Array, rate: float, keep: jax.Array) -> jax.Array:
    """Inverted dropout: x / (1 - rate) where `keep`, else 0 (in x's dtype)."""
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


class TokenKeys:
    """The dropout keys of a [B, T] token grid: `base` keys ([B, 1] per row, or [B, T] per token when texts
    are packed) and each token's position in its text ([B, T] or [1, T]). `site(layer, site)` gives the
    token keys k(r, site, t) of the module docstring."""

    def __init__(self, base: jax.Array, positions: jax.Array):
        self.base, self.positions = base, positions

    def at(self, *path: int) -> jax.Array:
        keys = self.base
        for i in path:
            keys = fold(keys, i)
        return fold(keys, self.positions)

    def layer(self, i) -> TokenKeys:
        return TokenKeys(fold(self.base, i), self.positions)

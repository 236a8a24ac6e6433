"""Dropout masks that follow the text and the token's position in it, never its place in a tensor.

A text (a global batch row r: queries 0..B-1, positives B..2B-1, negative (i, j) at 2B + iK + j) has the
row key k_r = jax.random.fold_in(step_key, r). Everything below it is 32-bit integer hashing, with

    mix(x)       = the `triple32` integer hash (three multiply / xor-shift rounds; a bijection of uint32)
    join(s, v)   = mix(s ^ (v * 0x9E3779B9))    (a bijection of v for a fixed s: distinct v, distinct outputs)

    seed(k_r)          = join(mix(w_0), w_1) ...   over the words w of the key's data (2 for threefry)
    s(r, layer, site, t) = join(join(join(seed, layer), site), t)   (sites 0, 1, 2 inside a block)
    s(r, emb, t)         = join(join(seed, 1_000_000), t)           (dropout after the embeddings)

and the token at position t (0 = [CLS]) keeps element c of its mask when join(s, c) < round(p * 2^32),
c = d on the hidden sites ([D] per token) and c = n * M + s on the attention probabilities (head n, key
position s, M = max_position_embeddings). Padding a text to any length, chunking the batch, sharding it, or
packing several texts into one row therefore draws exactly the same masks for every real token.

Cost: one mask element is one `join`: 13 integer ops on a hidden site (xor, the hash's 11, a compare; the
counter's product is a constant) and 16 on the attention probabilities (the counter's two, its product). The
threefry-2x32 bits jax.random.bernoulli draws cost ~120 per element (20 rounds of add / rotate / xor, key
injections, the float construction), which on an accelerator runs on integer units far slower than its
matmul units, and made dropout most of the program XLA compiles (benchmarks/bench_dropout.py counts both).
The hash passes the statistical checks in tests/test_model.py (keep rate, independence of neighbouring
elements, tokens, layers, sites and steps); dropout needs no more than that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EMBED_SITE = 1_000_000  # distinct from every layer index
SITE_ATTN_PROBS, SITE_ATTN_OUT, SITE_FFN_OUT = 0, 1, 2
_GOLDEN = 0x9E3779B9  # odd, so v -> v * _GOLDEN is a bijection of uint32
_TRIPLE32 = ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB))  # (shift, odd multiplier) per round
_FINAL_SHIFT = 14


def mix(x: jax.Array) -> jax.Array:
    """triple32: x ^= x >> 17; x *= 0xED5AD4BB; x ^= x >> 11; x *= 0xAC4C1B51; x ^= x >> 15;
    x *= 0x31848BAB; x ^= x >> 14 (uint32, wrapping; every step invertible)."""
    for shift, multiplier in _TRIPLE32:
        x = (x ^ (x >> jnp.uint32(shift))) * jnp.uint32(multiplier)
    return x ^ (x >> jnp.uint32(_FINAL_SHIFT))


def join(seed: jax.Array, value) -> jax.Array:
    """mix(seed ^ value * 0x9E3779B9), seed and value broadcast together (uint32)."""
    value = jnp.asarray(value).astype(jnp.uint32)
    return mix(seed ^ (value * jnp.uint32(_GOLDEN)))


def key_seed(keys: jax.Array) -> jax.Array:
    """uint32 seeds of a PRNG key array (any implementation): its data words joined in order."""
    words = jax.random.key_data(keys).astype(jnp.uint32)
    seed = mix(words[..., 0])
    for i in range(1, words.shape[-1]):
        seed = join(seed, words[..., i])
    return seed


def row_keys(key: jax.Array, rows) -> jax.Array:
    """One dropout key per global row index (any shape of `rows`): jax.random.fold_in(key, row)."""
    rows = jnp.asarray(rows)
    flat = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows.reshape(-1).astype(jnp.uint32))
    return flat.reshape(rows.shape)


def _threshold(p: float) -> jax.Array:
    """round(p * 2^32) as uint32 (keep iff hash < threshold: P(keep) = threshold / 2^32, |error| <= 2^-33)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"keep probability must be in (0, 1), got {p}")
    return jnp.uint32(min(round(p * 2.0 ** 32), 2 ** 32 - 1))


def keep_hidden(token_seeds: jax.Array, p: float, width: int) -> jax.Array:
    """[..., width] booleans: entry [..., d] = join(token_seeds[...], d) < round(p 2^32)."""
    counter = jax.lax.broadcasted_iota(jnp.uint32, (*token_seeds.shape, width), token_seeds.ndim)
    return join(token_seeds[..., None], counter) < _threshold(p)


def keep_attention(token_seeds_bt: jax.Array, key_positions_bs: jax.Array, p: float, num_heads: int,
                   max_positions: int) -> jax.Array:
    """[B, N, T, S] booleans for attention probabilities [B, N, T, S]: entry [b, n, t, s] =
    join(token_seeds_bt[b, t], n * M + key_positions_bs[b, s]) < round(p 2^32)."""
    if num_heads * max_positions >= 2 ** 32:
        raise ValueError(f"{num_heads} heads x {max_positions} positions exceed 32-bit dropout counters")
    b, t = token_seeds_bt.shape
    s = key_positions_bs.shape[1]
    heads = jax.lax.broadcasted_iota(jnp.uint32, (b, num_heads, t, s), 1)
    counter = heads * jnp.uint32(max_positions) + key_positions_bs.astype(jnp.uint32)[:, None, None, :]
    return join(token_seeds_bt[:, None, :, None], counter) < _threshold(p)


def apply(x: jax.Array, rate: float, keep: jax.Array) -> jax.Array:
    """Inverted dropout: x / (1 - rate) where `keep`, else 0 (in x's dtype)."""
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


class TokenKeys:
    """The dropout seeds of a [B, T] token grid: `seeds` (uint32, [B, 1] per row, or [B, T] per token when
    texts are packed) and each token's position in its text ([B, T] or [1, T]). `at(layer, site)` gives the
    token seeds s(r, layer, site, t) of the module docstring."""

    def __init__(self, seeds: jax.Array, positions: jax.Array):
        self.seeds, self.positions = seeds, positions

    @classmethod
    def from_keys(cls, keys: jax.Array, positions: jax.Array) -> TokenKeys:
        return cls(key_seed(keys), positions)

    def at(self, *path: int) -> jax.Array:
        seeds = self.seeds
        for i in path:
            seeds = join(seeds, i)
        return join(seeds, self.positions)

    def layer(self, i) -> TokenKeys:
        return TokenKeys(join(self.seeds, i), self.positions)

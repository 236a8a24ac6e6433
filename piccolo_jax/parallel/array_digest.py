"""A checksum of every array of a pytree, computed on the devices: what a checkpoint's content is verified
against when it is restored (a flipped byte in a checkpoint file loads silently otherwise), and what
identifies a model's weights in its mteb revision (`evaluation.mteb_model`).

Each leaf gets two uint32 sums over its elements' bit patterns b_i (i = flat index):

    s1 = sum_i b_i * (2i + 1)        mod 2^32   (an odd weight is invertible mod 2^32, so changing any one
                                                 element always changes s1)
    s2 = sum_i mix(b_i xor i)         mod 2^32   (mix: a murmur3-style finaliser; catches what cancels in s1)

Integer addition mod 2^32 is associative and commutative, so both sums are exact whatever the sharding,
the number of devices or processes and the reduction order: a state saved on 8 devices verifies on 1.
Bit patterns, not values: -0.0 vs 0.0 and NaN payloads count as differences.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _bits_n(x: jax.Array) -> jax.Array:
    """The elements of x as uint32 bit patterns, flattened: [N]."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        x = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif size in (1, 2):
        x = jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
    else:  # 8-byte types (jax_enable_x64): both halves
        x = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return x.reshape(-1)


def _mix(h: jax.Array) -> jax.Array:
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_digest(x: jax.Array) -> jax.Array:
    """uint32[2] (s1, s2) of one array (see the module docstring)."""
    b_n = _bits_n(x)
    i_n = jnp.arange(b_n.shape[0], dtype=jnp.uint32)
    return jnp.stack([jnp.sum(b_n * (2 * i_n + 1), dtype=jnp.uint32),
                      jnp.sum(_mix(b_n ^ i_n), dtype=jnp.uint32)])


def _mesh_of(tree: Any):
    for leaf in jax.tree.leaves(tree):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    return None


def _digest_leaves(leaves: list) -> list[jax.Array]:
    return [_leaf_digest(x) for x in leaves]


@functools.lru_cache(maxsize=8)
def _digest_program(mesh):
    """One jitted function per mesh (a run saves many times: traced and compiled once)."""
    out = None if mesh is None else NamedSharding(mesh, P())  # replicated: every process can read it
    return jax.jit(_digest_leaves, out_shardings=out)


def tree_digest(tree: Any) -> dict[str, list[int]]:
    """{leaf path: [s1, s2]} of every array in `tree` (jax arrays, possibly sharded over processes)."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = _digest_program(_mesh_of(tree))([leaf for _, leaf in paths_leaves])
    return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(s)]
            for (path, _), s in zip(paths_leaves, sums)}


def digest_mismatch(saved: dict[str, list[int]], restored: dict[str, list[int]]) -> str | None:
    """None if equal, else a short description of the first differences."""
    if saved == restored:
        return None
    missing = sorted(set(saved) ^ set(restored))
    if missing:
        return f"arrays {missing[:3]} differ in name from the checksum written at save time"
    bad = [k for k in saved if saved[k] != restored[k]]
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"{', '.join(bad[:3])}{more}: content differs from the checksum written at save time"

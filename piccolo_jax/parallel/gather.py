"""Rows across processes: which process owns each row of a sharded array, and gathering the rows every
process computed back into input order on every process (multi-host encode / evaluate / mine)."""

from __future__ import annotations

import numpy as np

GATHER_ROWS = 16384  # rows per process and all-gather: 16,384 x 1,024 x 4 B = 64 MiB per process


def gather_rows(local_nd: np.ndarray, owners_n: np.ndarray) -> np.ndarray:
    """Rows computed across processes, assembled in every process: out[i] = row i from process owners_n[i].

    `local_nd` [N, D] holds valid rows where owners_n == this process; the other rows are overwritten in
    place and `local_nd` is returned. Every process passes the same `owners_n`. One process: unchanged.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return local_nd
    return assemble_rows(local_nd, owners_n, jax.process_index(), jax.process_count(),
                         multihost_utils.process_allgather)


def process_rows(owners_n: np.ndarray, count: int) -> list[np.ndarray]:
    """Input positions each process computed, ascending (input order): the split, from `owners_n` alone."""
    owners_n = np.asarray(owners_n)
    return [np.flatnonzero(owners_n == p) for p in range(count)]


def assemble_rows(local_nd: np.ndarray, owners_n: np.ndarray, me: int, count: int, allgather) -> np.ndarray:
    """`gather_rows` with the process index, count and all-gather (`send` [M, D] -> [count, M, D]) given."""
    rows = process_rows(owners_n, count)
    widest = max(len(r) for r in rows)
    if widest == 0:
        return local_nd
    piece = min(GATHER_ROWS, 1 << max(3, (widest - 1).bit_length()))  # a power of two: few compiled shapes
    for start in range(0, widest, piece):
        mine = rows[me][start:start + piece]
        send = np.zeros((piece,) + local_nd.shape[1:], local_nd.dtype)
        send[:len(mine)] = local_nd[mine]
        got = np.asarray(allgather(send))  # [P, piece, D], the same in every process
        for p in range(count):
            theirs = rows[p][start:start + piece]
            local_nd[theirs] = got[p, :len(theirs)]
    return local_nd


def to_global(x: np.ndarray, sharding):
    """A host array every process holds alike, as a global array: each process supplies its own devices'."""
    import jax

    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def owner_processes(sharding, shape: tuple[int, ...]) -> np.ndarray:
    """Per index of axis 0 of an array of `shape` under `sharding`: the lowest process index holding it.

    Every process derives the same answer (from the sharding's global device map), without talking.
    """
    owners = np.full(shape[0], np.iinfo(np.int32).max, np.int32)
    for device, index in sharding.devices_indices_map(tuple(shape)).items():
        rows = index[0]
        lo, hi = rows.start or 0, shape[0] if rows.stop is None else rows.stop
        owners[lo:hi] = np.minimum(owners[lo:hi], device.process_index)
    return owners

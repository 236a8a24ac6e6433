"""Packed sequences: several texts per row of a fixed length, so that the encoder computes real tokens only.

A *block* is the unit a device encodes at once: the texts of one gradient-caching chunk on one batch
shard (the whole shard's rows without chunks). With B rows, S batch shards and C chunks, every block
holds m = B / (S C) queries and their documents, and block j = s C + c holds global rows
[j m, (j + 1) m) (gradient caching interleaves chunks over shards: `grad_cache.to_chunks`):

    queries    slot i           = query of row j m + i                      (m slots)
    documents  slot i           = positive of row j m + i                   (m (1 + K) slots)
               slot m + i K + k = hard negative k of row j m + i

Each side of a block is packed into R rows of L tokens (L = the side's max length, so every text fits a
row). The token at row r, column u carries three int32 arrays: its token id, its position in its text
(0 = [CLS]) and its segment id (slot + 1; 0 = padding). The packed batch of a host is, per side,
[blocks of this host x R, L] in block order, plus the token counts of its texts ([b] queries, [b, 1 + K]
documents), which also give B and K to the train step.

Shapes are static: R is one number per side for the whole run (`Loader.enable_packing`: the most rows
any block of the first batches needs, plus 5 %). Every host decides, without talking, whether a batch
fits: it packs *upper bounds* of every text's token count (from its characters,
`tokenization.char_token_bounds`; every host reads the texts of all rows) with first-fit decreasing, for
all blocks of the global batch. A batch whose bounds need more than R rows in any block falls back to the
padded layout (the same results; one more compiled program, counted in the log). Each host then packs
its own blocks with the real token counts, and where first-fit on those would need more rows than the
bounds' layout (first-fit is not monotone), it writes the tokens at the bounds' layout, which fits by
construction.

First-fit decreasing (Johnson 1973) uses at most 11/9 OPT + 1 rows; real tokens / computed tokens is the
*packing efficiency* the trainer logs (padding to one length per global batch at piccolo's 32,768 pairs
of 10-30 token queries and 50-300 token passages computes mostly padding).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from piccolo_jax.text.ragged import Ragged

HEADROOM = 0.05  # rows above the most seen in the sampled batches
SAMPLE_STEPS = 64  # batches sampled to size R
SAMPLE_TEXTS = 500_000  # at most this many texts sampled (large global batches: fewer steps)


@dataclasses.dataclass(frozen=True)
class PackingSpec:
    """The packed shapes of a run: per side, R rows of L tokens per block."""

    shards: int  # S: batch shards (data-parallel devices)
    num_chunks: int  # C: gradient-caching chunks
    query_rows: int  # R_q
    query_length: int  # L_q = query max length
    document_rows: int  # R_d
    document_length: int  # L_d = passage max length

    def describe(self, global_batch: int, num_negatives: int) -> str:
        m = global_batch // (self.shards * self.num_chunks)
        return (f"packing: per device and chunk, {m} queries in {self.query_rows} row(s) x {self.query_length} "
                f"tokens, {m * (1 + num_negatives)} documents in {self.document_rows} row(s) x "
                f"{self.document_length} (instead of {m} x {self.query_length} and {m * (1 + num_negatives)} x "
                f"{self.document_length} padded); a batch that needs more rows is padded instead (counted)")


def first_fit(lengths_nm: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-fit decreasing of each block's texts into rows of `capacity` tokens, vectorised over blocks.

    lengths_nm [n, m]: token counts (0 = no text, not placed), each <= capacity. Returns (rows used [n],
    row [n, m], offset [n, m]): text i of block j starts at column offset[j, i] of row row[j, i] (-1 for
    empty texts). Texts go longest first (ties by slot) into the first row with room; first fit never
    leaves two rows at most half full, so ceil(2 sum / capacity) + 1 rows always suffice.
    """
    lengths_nm = np.asarray(lengths_nm, np.int64)
    n, m = lengths_nm.shape
    if lengths_nm.size and lengths_nm.max() > capacity:
        raise ValueError(f"a text of {lengths_nm.max()} tokens does not fit a row of {capacity}")
    rows = np.full((n, m), -1, np.int64)
    offsets = np.full((n, m), -1, np.int64)
    if not lengths_nm.size:
        return np.zeros(n, np.int64), rows, offsets
    cap_rows = int(min(m, 2 * math.ceil(lengths_nm.sum(axis=1).max() / capacity) + 1))
    free = np.full((n, cap_rows), capacity, np.int64)
    order = np.argsort(-lengths_nm, axis=1, kind="stable")
    blocks = np.arange(n)
    for rank in range(m):
        slot = order[:, rank]
        size = lengths_nm[blocks, slot]
        row = np.argmax(free >= size[:, None], axis=1)  # first row with room (one always has: see above)
        place = size > 0
        offsets[blocks[place], slot[place]] = capacity - free[blocks[place], row[place]]
        rows[blocks[place], slot[place]] = row[place]
        free[blocks[place], row[place]] -= size[place]
        if (free < 0).any():
            raise AssertionError("first fit ran out of rows")  # impossible: see the docstring's bound
    return (free < capacity).sum(axis=1), rows, offsets


def query_blocks(x: np.ndarray, blocks: int) -> np.ndarray:
    """[B, ...] per-row values -> [blocks, m, ...] (block j = rows j m .. j m + m - 1)."""
    return x.reshape(blocks, x.shape[0] // blocks, *x.shape[1:])


def document_blocks(d: np.ndarray, blocks: int) -> np.ndarray:
    """[B, 1 + K] per-document values -> [blocks, m (1 + K)] in slot order (positives, then negatives)."""
    d = query_blocks(d, blocks)
    return np.concatenate([d[:, :, 0], d[:, :, 1:].reshape(blocks, -1)], axis=1)


def rows_needed(query_bounds: np.ndarray, document_bounds: np.ndarray, blocks: int, query_length: int,
                document_length: int) -> tuple[int, int]:
    """The most rows any block needs per side (first fit of the bounds), over all blocks of a batch."""
    rq, _, _ = first_fit(query_blocks(query_bounds, blocks), query_length)
    rd, _, _ = first_fit(document_blocks(document_bounds, blocks), document_length)
    return int(rq.max()), int(rd.max())


def with_headroom(rows: int, most: int) -> int:
    """rows + 5 % (rounded down), at most `most` (one text per row)."""
    return min(most, rows + int(HEADROOM * rows))


def _pack_blocks(texts: Ragged, blocks: int, bound_rows: np.ndarray, bound_offsets: np.ndarray,
                 num_rows: int, length: int, pad_id: int) -> tuple[dict[str, np.ndarray], int]:
    """Pack `blocks` blocks of texts (`texts`: blocks x slots rows, block-major, slot order) into ids /
    positions / segments [blocks x num_rows, length] int32, block j in rows [j num_rows, (j + 1) num_rows).

    Per block: first fit of the real token counts when it fits `num_rows`, else the bounds' layout
    (`bound_rows`, `bound_offsets` [blocks, slots], from `first_fit` of upper bounds, which fits). Token u of
    slot i goes to row j num_rows + row[j, i], column offset[j, i] + u. Returns the arrays and the real tokens.
    """
    lengths = texts.lengths.reshape(blocks, -1)
    used, rows, offsets = first_fit(lengths, length)
    fallback = used > num_rows
    rows = np.where(fallback[:, None], bound_rows, rows)
    offsets = np.where(fallback[:, None], bound_offsets, offsets)
    placed = lengths > 0
    bad = placed & ((rows >= num_rows) | (offsets + lengths > length))
    if bad.any():
        j, i = (int(x[0]) for x in np.nonzero(bad))
        raise AssertionError(f"text {i} ({lengths[j, i]} tokens) placed outside the packed block")
    text, column = texts.token_rows()  # text = j * slots + i
    slots = lengths.shape[1]
    start = ((np.arange(blocks)[:, None] * num_rows + rows) * length + offsets).reshape(-1)
    where = start[text] + column
    shape = (blocks * num_rows, length)
    ids = np.full(shape, pad_id, np.int32)
    positions = np.zeros(shape, np.int32)
    segments = np.zeros(shape, np.int32)
    ids.reshape(-1)[where] = texts.values
    positions.reshape(-1)[where] = column
    segments.reshape(-1)[where] = text % slots + 1
    return {"input_ids": ids, "positions": positions, "segments": segments}, int(lengths.sum())


def pack_side(token_ids: Ragged | Sequence[Sequence[int]], bound_rows: np.ndarray, bound_offsets: np.ndarray,
              num_rows: int, length: int, pad_id: int) -> tuple[dict[str, np.ndarray], int]:
    """Pack one block's texts (slot order) into ids / positions / segments [num_rows, length] int32.

    First fit of the real token counts when it fits `num_rows`, else the bounds' layout (`bound_rows`,
    `bound_offsets`, from `first_fit` of upper bounds, which fits). Returns the arrays and the real tokens.
    """
    texts = token_ids if isinstance(token_ids, Ragged) else Ragged.from_lists(token_ids)
    return _pack_blocks(texts, 1, np.asarray(bound_rows)[None], np.asarray(bound_offsets)[None], num_rows,
                        length, pad_id)


def pack_host_arrays(queries: Ragged, positives: Ragged, negatives: Ragged, spec: PackingSpec,
                     first_block: int, bound_layout: dict, pad_id: int) -> dict:
    """This host's packed arrays from its rows' token ids: queries [b], positives [b], negatives [b K]
    (row-major; K = 0: empty). `first_block` is the global index of this host's first block;
    `bound_layout` holds the bounds' first-fit layouts of all blocks ({"query": (rows, offsets),
    "document": (rows, offsets)}, [blocks, slots]). Block j of the host takes queries [j m, (j + 1) m),
    positives [j m, (j + 1) m) and negatives [j m K, (j + 1) m K) in that slot order (module doc).
    """
    b = len(queries)
    k = len(negatives) // max(b, 1)
    m = bound_layout["query"][0].shape[1]  # queries per block
    if b % m or first_block + b // m > bound_layout["query"][0].shape[0]:
        raise ValueError(f"{b} rows from block {first_block} do not split into blocks of {m}")
    n = b // m  # this host's blocks
    j = np.arange(n)[:, None]
    slots = np.concatenate([j * m + np.arange(m), b + j * m * k + np.arange(m * k)], axis=1)
    documents = Ragged.concat([positives, negatives]).take(slots.reshape(-1))
    batch, real = {}, 0
    for side, texts, r_count, length in (("query", queries, spec.query_rows, spec.query_length),
                                         ("document", documents, spec.document_rows, spec.document_length)):
        layout_rows, layout_offsets = (x[first_block:first_block + n] for x in bound_layout[side])
        arrays, n_real = _pack_blocks(texts, n, layout_rows, layout_offsets, r_count, length, pad_id)
        real += n_real
        batch.update({f"packed_{side}_{name}": arr for name, arr in arrays.items()})
    batch["packed_query_lengths"] = queries.lengths.astype(np.int32)
    batch["packed_document_lengths"] = np.concatenate(
        [positives.lengths[:, None], negatives.lengths.reshape(b, k)], axis=1).astype(np.int32)
    computed = n * (spec.query_rows * spec.query_length + spec.document_rows * spec.document_length)
    batch["packing"] = {"real_tokens": real, "computed_tokens": computed, "fallback": False}
    return batch


def pack_host_batch(query_ids: Sequence[Sequence[int]], document_ids: Sequence[Sequence[Sequence[int]]],
                    spec: PackingSpec, first_block: int, bound_layout: dict, pad_id: int) -> dict:
    """`pack_host_arrays` of token id lists: queries [b], documents [b][1 + K] (positive, then negatives)."""
    return pack_host_arrays(Ragged.from_lists(query_ids), Ragged.from_lists([d[0] for d in document_ids]),
                            Ragged.from_lists([t for d in document_ids for t in d[1:]]), spec, first_block,
                            bound_layout, pad_id)


PACKED_KEYS = tuple(f"packed_{side}_{name}" for side in ("query", "document")
                    for name in ("input_ids", "positions", "segments", "lengths"))
PADDED_KEYS = tuple(f"{side}_{name}" for side in ("query", "passage", "negative")
                    for name in ("input_ids", "attention_mask"))


def step_arrays(host_batch: dict) -> dict[str, np.ndarray]:
    """The arrays of a host batch that the train step takes (packed or padded layout)."""
    keys = PACKED_KEYS if "packed_query_input_ids" in host_batch else PADDED_KEYS
    return {k: host_batch[k] for k in keys if k in host_batch}


def token_counts(host_batch: dict) -> tuple[int, int]:
    """(real tokens, computed tokens) of a host batch, packed or padded."""
    if "packing" in host_batch and not host_batch["packing"]["fallback"]:
        return host_batch["packing"]["real_tokens"], host_batch["packing"]["computed_tokens"]
    masks = [v for k, v in host_batch.items() if k.endswith("attention_mask")]
    return sum(int(v.sum()) for v in masks), sum(int(v.size) for v in masks)



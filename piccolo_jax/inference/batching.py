"""Inference batch plans: texts sorted by length and cut into token-budget batches, padded to a few
bucketed lengths (`plan_batches`) or packed several texts per row (`plan_packed_batches`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


# ------------------------------------------------------------------------------------------------ inference
@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """One packed inference batch: `blocks` blocks of `rows_per_block` rows of `length` tokens; text
    `texts[i]` (an input position) is in block `block[i]`, slot `slot[i]`, at (row[i], offset[i])."""

    texts: np.ndarray  # int64 [n]
    block: np.ndarray
    slot: np.ndarray
    row: np.ndarray  # row within its block
    offset: np.ndarray
    blocks: int
    rows_per_block: int
    length: int
    num_slots: int  # static slots per block: min(rows x length / 2, max_texts)


def _round_rows(x: int) -> int:
    """x rounded up to 8 steps per octave (1..8 exact, then multiples of 2, 4, ...): few shapes, < 1/8 waste."""
    step = max(1, (1 << max(0, (int(x) - 1).bit_length())) // 8)
    return -(-int(x) // step) * step


def plan_packed_batches(lengths_n: np.ndarray, tokens_per_batch: int, bucket, blocks: int = 1,
                        max_texts: int | None = None) -> list[PackedBatch]:
    """Cut texts (token counts `lengths_n`) into packed batches of about `tokens_per_batch` tokens.

    Texts are sorted longest first. A batch's row length L = bucket(its longest text) (`bucket`: e.g.
    `inference.bucket_length`); it has blocks x r rows, r = tokens_per_batch // (L x blocks) (at least 1).
    Texts fill them by first fit from the long end until one does not fit, then from the short end into
    the gaps left, until the shortest left does not fit or the batch holds `max_texts` texts. A batch that
    ends early (max_texts, or the last one) keeps the rows it uses per block rounded up to 8 steps per
    octave, so few shapes are compiled. Each text is in one row; a row holds at most L / 2 texts ([CLS] [SEP]).
    """
    lengths_n = np.asarray(lengths_n, np.int64)
    order = np.argsort(-lengths_n, kind="stable")
    out, lo, hi = [], 0, len(order)  # texts order[lo:hi] are left, longest first
    while lo < hi:
        length = int(bucket(int(lengths_n[order[lo]])))
        r_full = max(1, tokens_per_batch // (length * blocks))
        free = np.full(r_full * blocks, length, np.int64)
        taken, rows, offsets, full = [], [], [], False

        def place(i: int) -> bool:
            size = int(lengths_n[order[i]])
            r = int(np.argmax(free >= size))
            if free[r] < size:
                return False
            taken.append(order[i])
            rows.append(r)
            offsets.append(length - int(free[r]))
            free[r] -= size
            return True

        room = (lambda: len(taken) < max_texts) if max_texts else (lambda: True)
        while lo < hi and room() and place(lo):
            lo += 1
        if lo < hi and room():  # the longest left does not fit: fill the gaps with the shortest
            full = True
            while lo < hi and room() and place(hi - 1):
                hi -= 1
        used = int((free < length).sum())  # first fit opens rows in order: rows 0 .. used-1
        r_block = r_full if full else min(r_full, _round_rows(-(-used // blocks)))
        rows_g = np.asarray(rows, np.int64)
        block = rows_g // r_block
        slot = np.zeros(len(rows_g), np.int64)
        seen: dict[int, int] = {}
        for t, blk in enumerate(block.tolist()):
            slot[t] = seen.get(blk, 0)
            seen[blk] = slot[t] + 1
        slots = r_block * length // 2 if max_texts is None else min(r_block * length // 2, max_texts)
        out.append(PackedBatch(np.asarray(taken, np.int64), block, slot, rows_g % r_block,
                               np.asarray(offsets, np.int64), blocks, r_block, length, slots))
    return out


def pack_inference_batch(token_ids: Sequence[Sequence[int]], batch: PackedBatch, pad_id: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32 ids / positions / segments [blocks x rows_per_block, length] of a `PackedBatch`."""
    shape = (batch.blocks * batch.rows_per_block, batch.length)
    ids, positions, segments = np.full(shape, pad_id, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for t, blk, slot, row, off in zip(batch.texts, batch.block, batch.slot, batch.row, batch.offset):
        seq = token_ids[t]
        r, n = blk * batch.rows_per_block + row, len(seq)
        ids[r, off:off + n] = seq
        positions[r, off:off + n] = np.arange(n)
        segments[r, off:off + n] = slot + 1
    return ids, positions, segments


# ------------------------------------------------------------------------------------------ batch planning
def bucket_length(n_tokens: int, max_length: int) -> int:
    """Smallest bucket >= n_tokens: steps of max(8, 2^(k-3)) inside the octave [2^k, 2^(k+1)).

    100 -> 104 (step 8), 200 -> 208 (step 16), 300 -> 320 (step 32); never above `max_length`.
    """
    n = max(int(n_tokens), 1)
    step = max(8, 1 << max(0, n.bit_length() - 4))
    return min(-(-n // step) * step, max_length)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One device batch: `rows` (indices into the input) padded to `num_rows` x `length` tokens."""

    rows: np.ndarray  # int64 [n_real] input positions, n_real <= num_rows
    num_rows: int  # B, a multiple of the batch-shard count
    length: int  # T, a bucket length


def plan_batches(lengths_n: np.ndarray, tokens_per_batch: int, max_length: int, row_multiple: int = 1,
                 max_rows: int | None = None) -> list[Batch]:
    """Cut rows (token counts `lengths_n`) into batches of about `tokens_per_batch` padded tokens.

    Rows are taken longest first; a batch's first row fixes its bucket length T, and it holds
    B = tokens_per_batch // T rows (at most `max_rows`) rounded down to a multiple of `row_multiple`
    (at least one multiple).
    Only the last batch can be short: its rows are padded to the next power-of-two multiple of
    `row_multiple` (at most B), which keeps the set of compiled shapes small across calls.
    """
    lengths_n = np.asarray(lengths_n)
    order = np.argsort(-lengths_n, kind="stable")
    batches, i, n = [], 0, len(order)
    while i < n:
        t = bucket_length(int(lengths_n[order[i]]), max_length)
        cap = tokens_per_batch // t if max_rows is None else min(tokens_per_batch // t, max_rows)
        b = max(row_multiple, cap // row_multiple * row_multiple)
        rows = order[i:i + b]
        if len(rows) < b:  # final batch: 2^j * row_multiple >= len(rows)
            groups = -(-len(rows) // row_multiple)
            b = min(b, row_multiple * (1 << (groups - 1).bit_length()))
        batches.append(Batch(rows=rows, num_rows=b, length=t))
        i += len(rows)
    return batches


def pack_batch(token_ids: Sequence[Sequence[int]], batch: Batch, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids [B, T] and mask [B, T]; dummy rows get one unmasked token so every row is well defined."""
    ids_bt = np.full((batch.num_rows, batch.length), pad_id, dtype=np.int32)
    mask_bt = np.zeros((batch.num_rows, batch.length), dtype=np.int32)
    for r, i in enumerate(batch.rows):
        row = token_ids[i]
        ids_bt[r, :len(row)] = row
        mask_bt[r, :len(row)] = 1
    mask_bt[len(batch.rows):, 0] = 1
    return ids_bt, mask_bt

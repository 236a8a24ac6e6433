"""Ragged int32 rows (token ids of texts of different lengths) as two numpy arrays, no Python lists.

Row i is `values[offsets[i] : offsets[i] + lengths[i]]`, offsets = exclusive cumulative sum of lengths.
Gathering, concatenating and padding are index arithmetic on the flat array: for N rows holding T
tokens in all, `take` and `padded` cost O(N + T) numpy work and no per-row Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Ragged(NamedTuple):
    """values [T] int32 (all rows back to back), lengths [N] int64."""

    values: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> Ragged:
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        values = np.fromiter((x for row in rows for x in row), np.int32, int(lengths.sum()))
        return cls(values, lengths)

    @classmethod
    def concat(cls, parts: Sequence[Ragged]) -> Ragged:
        """The rows of every part, in order."""
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.int64))
        return cls(np.concatenate([p.values for p in parts]).astype(np.int32, copy=False),
                   np.concatenate([p.lengths for p in parts]).astype(np.int64, copy=False))

    def __len__(self) -> int:  # rows, not tuple fields
        return len(self.lengths)

    @property
    def offsets(self) -> np.ndarray:
        """[N] int64: where each row starts in `values`."""
        return np.cumsum(self.lengths) - self.lengths

    def token_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(row [T], column [T]) int64 of every value: value t is token column[t] of row row[t]."""
        n = len(self.lengths)
        row = np.repeat(np.arange(n, dtype=np.int64), self.lengths)
        column = np.arange(len(self.values), dtype=np.int64) - np.repeat(self.offsets, self.lengths)
        return row, column

    def take(self, index: np.ndarray) -> Ragged:
        """Rows `index` (int array, any order, repeats allowed)."""
        index = np.asarray(index, np.int64)
        lengths = self.lengths[index]
        starts = np.repeat(self.offsets[index] - (np.cumsum(lengths) - lengths), lengths)
        return Ragged(self.values[starts + np.arange(int(lengths.sum()), dtype=np.int64)], lengths)

    def to_lists(self) -> list[list[int]]:
        flat = self.values.tolist()
        ends = np.cumsum(self.lengths).tolist()
        return [flat[e - n:e] for e, n in zip(ends, self.lengths.tolist())]

    def padded(self, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) [N, length] int32: each row left-aligned, then pad_id / 0; rows must fit `length`."""
        n = len(self.lengths)
        if n and self.lengths.max() > length:
            row = int(np.argmax(self.lengths > length))
            raise ValueError(f"row {row} has {self.lengths[row]} tokens, more than the padded length {length}")
        ids = np.full((n, length), pad_id, np.int32)
        mask = np.zeros((n, length), np.int32)
        row, column = self.token_rows()
        ids[row, column] = self.values
        mask[row, column] = 1
        return ids, mask

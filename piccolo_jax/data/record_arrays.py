"""The per-record arrays the sampler reads for every row of a global batch, in the narrowest dtype.

For record i of a dataset (`char_token_bounds` is the token upper bound of piccolo_jax.text.tokenizer):

    query_bounds[i]   = bound(prompt_i) + bound(query_i)
    passage_bounds[i] = max over the positives and negatives of record i of bound(text)
    num_negatives[i]  = len(negatives_i)
    task_ids[i]       = index of record i's task in records.TASKS (0 retrieval, 1 sts, 2 classification)

The batcher uses a bound only as min(max_length, round_up(max over rows of bound + extras)) and a count
only as `== 0` and `< K`, so every value is stored clipped at CAP = 65,535: exact for any max length
and any K up to 65,535 (BERT's positions end at 512). Each array takes the narrowest unsigned dtype
that holds its largest (clipped) value, and an array whose values are all equal is kept as one number
(a zero-stride view, 0 bytes a record): the num_negatives of a pairs dataset.

    pretrain pairs (texts <= 255 characters): uint8 + uint8 + constant (+ constant task) = 2 bytes a record
    finetune triplets (512-token passages):   uint8 + uint16 + uint8 (+ constant task)  = 4 bytes a record
    400 M pretrain records: 800 MB on disk, memory-mapped (`np.load(mmap_mode="r")`), so a host keeps
    resident only the pages its batches touch (at most the 800 MB, reclaimable page cache).

`RecordStats` builds the arrays chunk by chunk (4,096 records a vectorised call, 2 bytes a value
while building); `prepare` stores them as one .npy file each (`array_file`) next to a JSON
description {name: {"dtype", "constant"}}, read back by `load_arrays`. A dataset holds one task type, so `task_ids` is a constant
(0 bytes) in every dataset the loader accepts; one that is not names the first record that disagrees. A
description written before `task_ids` existed (TFDS format <= 3) reads as all retrieval.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Mapping, Sequence

import numpy as np

from piccolo_jax.config.data import TASKS
from piccolo_jax.data.records import Record
from piccolo_jax.text.tokenizer import char_token_bounds

ARRAY_NAMES = ("query_bounds", "passage_bounds", "num_negatives", "task_ids")
TASK_IDS = {task: i for i, task in enumerate(TASKS)}
CAP = 65_535  # clip of every stored value (see module doc)
_CHUNK = 4096  # records whose bounds are computed in one vectorised call
_COUNT_CHUNK = 1 << 24  # elements compared at once when counting (16 MB of booleans)


def narrow_dtype(max_value: int) -> np.dtype:
    """The narrowest unsigned dtype holding values in [0, min(max_value, CAP)]."""
    return np.dtype(np.uint8) if max_value <= 255 else np.dtype(np.uint16)


def narrow(values: np.ndarray) -> np.ndarray:
    """`values` clipped at CAP, in the narrowest unsigned dtype; a zero-stride view when all are equal."""
    values = np.asarray(values)
    if not len(values):
        return np.zeros(0, np.uint8)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0:
        raise ValueError(f"per-record values must be >= 0, got {lo}")
    hi = min(hi, CAP)
    dtype = narrow_dtype(hi)
    if lo >= hi:  # every value equal (after clipping)
        return np.broadcast_to(np.array(hi, dtype), values.shape)
    return np.minimum(values, CAP).astype(dtype)


def record_bounds(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(query_bound, passage_bound, num_negatives, task_ids) [len(records)] int64, unclipped (module doc)."""
    query = char_token_bounds([r.query for r in records]) + char_token_bounds(
        [r.prompt or "" for r in records])
    passages = [p for r in records for p in (*r.positives, *r.negatives)]
    owner = np.repeat(np.arange(len(records)), [len(r.positives) + len(r.negatives) for r in records])
    passage = np.zeros(len(records), np.int64)
    np.maximum.at(passage, owner, char_token_bounds(passages))
    negatives = np.fromiter((len(r.negatives) for r in records), np.int64, len(records))
    tasks = np.fromiter((TASK_IDS[r.task] for r in records), np.int64, len(records))
    return query, passage, negatives, tasks


class RecordStats:
    """Accumulates the per-record arrays chunk by chunk into growing uint16 buffers (2 bytes a value,
    no list of pieces to concatenate); `arrays()` returns them narrowed."""

    def __init__(self):
        self._pending: list[Record] = []
        self._values = tuple(array("H") for _ in ARRAY_NAMES)

    def add(self, record: Record) -> None:
        self._pending.append(record)
        if len(self._pending) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        records, self._pending = self._pending, []
        if records:
            for values, new in zip(self._values, record_bounds(records)):
                values.frombytes(np.minimum(new, CAP).astype(np.uint16).tobytes())

    def clipped(self) -> tuple[np.ndarray, ...]:
        """The arrays of ARRAY_NAMES clipped at CAP, uint16 (before narrowing); views of the buffers."""
        self._flush()
        return tuple(np.frombuffer(values, np.uint16) for values in self._values)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(query_bounds, passage_bounds, num_negatives, task_ids), each [N], narrowed (see module doc)."""
        return tuple(narrow(a) for a in self.clipped())


def array_file(directory: str, name: str) -> str:
    return os.path.join(directory, f"piccolo_{name}.npy")


def load_arrays(directory: str, meta: Mapping, num_records: int) -> tuple[np.ndarray, ...]:
    """The arrays written by `save_arrays`, memory-mapped read-only (constants as zero-stride views);
    raises ValueError naming the file when one is missing or has the wrong length or dtype."""
    out = []
    for name in ARRAY_NAMES:
        entry = meta.get(name)
        if entry is None and name == "task_ids":  # written before task types: every record is retrieval
            entry = {"dtype": "uint8", "constant": TASK_IDS["retrieval"]}
        elif entry is None:
            raise ValueError(f"{directory}: the description of the per-record arrays lacks {name!r}; prepare "
                             "the dataset again")
        if entry["constant"] is not None:
            out.append(np.broadcast_to(np.array(entry["constant"], entry["dtype"]), (num_records,)))
            continue
        path = array_file(directory, name)
        try:
            values = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise ValueError(f"{path}: missing; prepare the dataset again") from None
        if values.shape != (num_records,) or values.dtype.name != entry["dtype"]:
            raise ValueError(f"{path}: {values.dtype.name}{list(values.shape)}, expected "
                             f"{entry['dtype']}[{num_records}]; prepare the dataset again")
        out.append(values)
    return tuple(out)


def negatives_histogram(num_negatives: np.ndarray) -> dict[int, int]:
    """{count: records with that many negatives (clipped at CAP)}, counted in chunks."""
    if len(num_negatives) and num_negatives.strides == (0,):
        return {int(num_negatives[0]): len(num_negatives)}
    total = np.zeros(CAP + 1, np.int64)
    for start in range(0, len(num_negatives), _COUNT_CHUNK):
        chunk = np.asarray(num_negatives[start:start + _COUNT_CHUNK])
        counts = np.bincount(chunk, minlength=1)
        total[:len(counts)] += counts
    return {int(v): int(total[v]) for v in np.flatnonzero(total)}


def negatives_shortfall(histogram: Mapping[int, int], k: int) -> tuple[int, int]:
    """(records without negatives, records with 1..k-1 negatives) from a `negatives_histogram`."""
    without = int(histogram.get(0, 0))
    fewer = sum(int(n) for count, n in histogram.items() if 0 < int(count) < k)
    return without, fewer

"""Datasets on disk with random access: JSONL files and TFDS array_record directories.

Every source holds the three per-record arrays the sampler needs for every row of a global batch
without reading its text (`query_bounds`, `passage_bounds`, `num_negatives`; see record_arrays for
their arithmetic and dtypes) and reads records back on demand with `records(ids)`.

* JSONL: opening reads the file once; every line is parsed and validated, and per good record the
  byte offset (int64), length (uint32) and line number (uint32) are kept: 16 bytes a record plus the
  2..4 of the arrays. Measured (benchmarks/bench_data_scale.py): 7.6 us a record, so 400 M records
  take ~50 minutes and 7.2 GB (+ allocator slack) per host. Lines are read back with `os.pread`.
* TFDS (written by `piccolo-jax prepare`): opening reads the metadata and memory-maps the arrays;
  nothing per record is read or held: 0.03 s for 4 datasets of 5 M records. Reading adds the shard
  readers' index, ~1.1 bytes a record (see tfds_store).

Which paths are datasets is decided by piccolo_jax.data.discovery (re-exported here).
"""

from __future__ import annotations

import logging
import os
import weakref
from array import array
from collections.abc import Sequence

import numpy as np

from piccolo_jax.data import record_arrays
from piccolo_jax.data.discovery import find_dataset_paths, jsonl_stem
from piccolo_jax.data.jsonl_scan import TRAINER_HINT, BadRecords, scan_lines
from piccolo_jax.data.records import Record, parse_line

__all__ = ["JsonlSource", "Source", "TfdsSource", "find_dataset_paths", "open_sources"]

log = logging.getLogger(__name__)


class Source:
    """Base class: `name`, `path`, `len()`, `records(ids)`, the per-record arrays and bad-record counts."""

    name: str
    path: str
    query_bounds: np.ndarray
    passage_bounds: np.ndarray
    num_negatives: np.ndarray

    def __init__(self):
        self.bad_records: dict[str, int] = {}  # file -> records skipped
        self.bad_messages: list[str] = []  # the first few "file:line: reason" of those
        self._negatives_histogram: dict[int, int] | None = None

    def __len__(self) -> int:
        return len(self.query_bounds)

    def records(self, ids: Sequence[int]) -> list[Record]:
        raise NotImplementedError

    def negatives_shortfall(self, k: int) -> tuple[int, int]:
        """(records without negatives, records with 1..k-1), counted in chunks (or read from the
        dataset's metadata) rather than by comparing the whole array at once."""
        if self._negatives_histogram is None:
            self._negatives_histogram = record_arrays.negatives_histogram(self.num_negatives)
        return record_arrays.negatives_shortfall(self._negatives_histogram, k)

    def _take_bad(self, bad: BadRecords) -> None:
        self.bad_records[bad.path] = bad.count
        self.bad_messages = list(bad.messages)
        bad.log(log)


class JsonlSource(Source):
    """One JSONL file = one dataset, named after the file without its .jsonl suffix.

    `skip_hint` ends the error of a bad record: how the caller's user skips such records.
    """

    def __init__(self, path: str, record_format: str = "auto", skip_bad_records: bool = False,
                 max_record_bytes: int = 1 << 20, skip_hint: str = TRAINER_HINT):
        super().__init__()
        self.path = path
        self.name = jsonl_stem(path)
        self.record_format = record_format
        # growing buffers of 8 + 4 + 4 bytes a record ("I" is 4 bytes; a line past 2**32 widens to "q")
        offsets, lengths, lines = array("q"), array("I" if max_record_bytes < 1 << 32 else "q"), array("I")
        stats, bad = record_arrays.RecordStats(), BadRecords(path)
        with open(path, "rb") as f:
            for offset, length, line_no, record in scan_lines(
                    f, path, record_format=record_format, max_record_bytes=max_record_bytes,
                    bad=bad if skip_bad_records else None, hint=skip_hint):
                offsets.append(offset)
                lengths.append(length)
                if line_no >= 1 << 32 and lines.typecode == "I":
                    lines = array("q", lines)
                lines.append(line_no)
                stats.add(record)
        self._offsets = np.frombuffer(offsets, np.int64)
        self._lengths = np.frombuffer(lengths, np.uint32 if lengths.typecode == "I" else np.int64)
        self.line_numbers = np.frombuffer(lines, np.uint32 if lines.typecode == "I" else np.int64)  # 1-based
        self.query_bounds, self.passage_bounds, self.num_negatives = stats.arrays()
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        self._take_bad(bad)

    def records(self, ids: Sequence[int]) -> list[Record]:
        """The records at positions `ids` among the file's good lines (thread-safe)."""
        return [parse_line(os.pread(self._fd, int(self._lengths[i]), int(self._offsets[i])),
                           self.record_format) for i in ids]


class TfdsSource(Source):
    """A TFDS dataset written by `piccolo-jax prepare` (array_record), read with random access."""

    def __init__(self, path: str, split: str = "train"):
        super().__init__()
        from piccolo_jax.data import tfds_store

        self.path = path
        try:
            opened = tfds_store.open_dataset(path, split)
        except ImportError as e:
            raise ImportError(f"{path}: reading a TFDS dataset needs tensorflow-datasets and array-record "
                              f"({e}); pip install 'piccolo-jax[tfds]'") from e
        self.name, self._data = opened.name, opened.records
        self.query_bounds, self.passage_bounds, self.num_negatives = opened.arrays
        self._negatives_histogram = opened.negatives_histogram
        self._decode = tfds_store.decode_example
        self._example = tfds_store._example_class()
        if opened.bad is not None:
            self._take_bad(opened.bad)

    def records(self, ids: Sequence[int]) -> list[Record]:
        """The records at positions `ids` (thread-safe: one lock per shard reader)."""
        return [self._decode(raw, self._example) for raw in self._data.read(ids)]


def open_sources(paths: Sequence[str], record_format: str = "auto", skip_bad_records: bool = False,
                 max_record_bytes: int = 1 << 20, skip_hint: str = TRAINER_HINT) -> list[Source]:
    """Open every dataset under `paths` (see discovery); dataset names must be unique."""
    sources: list[Source] = []
    for path in find_dataset_paths(paths):
        if os.path.isdir(path):
            sources.append(TfdsSource(path))
        else:
            sources.append(JsonlSource(path, record_format, skip_bad_records, max_record_bytes, skip_hint))
    by_name: dict[str, str] = {}
    for source in sources:
        if source.name in by_name:
            raise ValueError(f"dataset name {source.name!r} is used by both {by_name[source.name]} and "
                             f"{source.path}; rename one")
        by_name[source.name] = source.path
    return sources

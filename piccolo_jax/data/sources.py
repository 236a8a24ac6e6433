"""Datasets on disk with random access: JSONL files and TFDS array_record directories.

Every source holds the per-record arrays the sampler needs for every row of a global batch without
reading its text (`query_bounds`, `passage_bounds`, `num_negatives`, `task_ids`; see record_arrays for
their arithmetic and dtypes) and reads records back on demand with `records(ids)`.

Each dataset has one task type (`Source.task`: "retrieval", "sts" or "classification"), which picks
its loss: the task of its records, all of which must agree (the first record that disagrees is refused
with its file:line), or the one `resolve_task` is given (`data.dataset_tasks`), which may only read
retrieval-format records (a uniem triplet, a BGE row) as classification, each with its own negatives.

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
from collections.abc import Mapping, Sequence

import numpy as np

from piccolo_jax.config.data import TASKS
from piccolo_jax.data import record_arrays
from piccolo_jax.data.discovery import find_dataset_paths, find_datasets, jsonl_stem
from piccolo_jax.data.jsonl_scan import TRAINER_HINT, BadRecords, scan_lines
from piccolo_jax.data.records import BadRecord, Record, parse_line, record_from_json

__all__ = ["ArrowSource", "JsonlSource", "Source", "TfdsSource", "find_dataset_paths", "open_sources"]

log = logging.getLogger(__name__)


class Source:
    """Base class: `name`, `path`, `len()`, `records(ids)`, the per-record arrays and bad-record counts."""

    name: str
    path: str
    query_bounds: np.ndarray
    passage_bounds: np.ndarray
    num_negatives: np.ndarray
    task_ids: np.ndarray

    def __init__(self):
        self.bad_records: dict[str, int] = {}  # file -> records skipped
        self.bad_messages: list[str] = []  # the first few "file:line: reason" of those
        self._negatives_histogram: dict[int, int] | None = None
        self.task: str = "retrieval"  # the dataset's task type (module doc); set from the records

    def where(self, i: int) -> str:
        """"file:line" of record i (for messages)."""
        raise NotImplementedError

    def records_task(self) -> str:
        """The task type of the records (all agree: checked when the source is opened)."""
        return TASKS[int(self.task_ids[0])] if len(self.task_ids) else "retrieval"

    def check_one_task(self) -> None:
        """Refuse a dataset whose records are of several task types, naming the first that disagrees."""
        if not len(self.task_ids) or self.task_ids.strides == (0,):
            return
        first = int(self.task_ids[0])
        other = np.flatnonzero(np.asarray(self.task_ids) != first)
        if len(other):
            i = int(other[0])
            raise BadRecord(f"{self.where(i)}: a {TASKS[int(self.task_ids[i])]} record in a dataset of "
                            f"{TASKS[first]} records (from {self.where(0)}): one dataset holds one task type "
                            "(one loss); put each task type in its own file")

    def resolve_task(self, declared: str | None = None) -> str:
        """Set and return `task`: the records' task, or `declared` (see the module doc)."""
        detected = self.records_task()
        if declared is None or declared == detected:
            self.task = detected
            return detected
        if declared not in TASKS:
            raise ValueError(f"data.dataset_tasks sets {self.name!r} to {declared!r}; expected one of {TASKS}")
        if (declared, detected) != ("classification", "retrieval"):
            raise ValueError(f"data.dataset_tasks sets {self.name!r} to {declared!r}, but its records are "
                             f"{detected} records ({self.where(0)}); only retrieval-format records (triplets, "
                             "BGE rows) can be read as classification")
        lacking = self._first_without_negatives()
        if lacking is not None:
            raise BadRecord(f"{self.where(lacking)}: a record without negatives in {self.name!r}, which "
                            "data.dataset_tasks makes a classification dataset: each classification record needs "
                            "its own negatives (other rows of the batch are not its negatives)")
        self.task = declared
        return declared

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

    def _first_without_negatives(self) -> int | None:
        """The index of the first record without negatives, or None (from the histogram, then in chunks)."""
        if self._negatives_histogram is None:
            self._negatives_histogram = record_arrays.negatives_histogram(self.num_negatives)
        if not self._negatives_histogram.get(0):
            return None
        step = 1 << 24
        for start in range(0, len(self), step):
            hits = np.flatnonzero(np.asarray(self.num_negatives[start:start + step]) == 0)
            if len(hits):
                return start + int(hits[0])
        return None

    def _take_bad(self, bad: BadRecords) -> None:
        self.bad_records[bad.path] = bad.count
        self.bad_messages = list(bad.messages)
        bad.log(log)


class JsonlSource(Source):
    """One JSONL file = one dataset, named after the file without its .jsonl suffix.

    `skip_hint` ends the error of a bad record: how the caller's user skips such records.
    """

    def __init__(self, path: str, record_format: str = "auto", skip_bad_records: bool = False,
                 max_record_bytes: int = 1 << 20, skip_hint: str = TRAINER_HINT, columns=None, name=None):
        super().__init__()
        self.path = path
        self.name = name or jsonl_stem(path)
        self.record_format, self.columns = record_format, columns
        # growing buffers of 8 + 4 + 4 bytes a record ("I" is 4 bytes; a line past 2**32 widens to "q")
        offsets, lengths, lines = array("q"), array("I" if max_record_bytes < 1 << 32 else "q"), array("I")
        stats, bad = record_arrays.RecordStats(), BadRecords(path)
        first: tuple[str, int] | None = None  # (task, line) of the first good record
        with open(path, "rb") as f:
            for offset, length, line_no, record in scan_lines(
                    f, path, record_format=record_format, max_record_bytes=max_record_bytes,
                    bad=bad if skip_bad_records else None, hint=skip_hint, columns=columns):
                if first is None:
                    first = (record.task, line_no)
                elif record.task != first[0]:  # refused even when skipping bad records: a file error
                    raise BadRecord(f"{path}:{line_no}: a {record.task} record in a dataset of {first[0]} records "
                                    f"(from {path}:{first[1]}): one dataset holds one task type (one loss); put "
                                    "each task type in its own file")
                offsets.append(offset)
                lengths.append(length)
                if line_no >= 1 << 32 and lines.typecode == "I":
                    lines = array("q", lines)
                lines.append(line_no)
                stats.add(record)
        self._offsets = np.frombuffer(offsets, np.int64)
        self._lengths = np.frombuffer(lengths, np.uint32 if lengths.typecode == "I" else np.int64)
        self.line_numbers = np.frombuffer(lines, np.uint32 if lines.typecode == "I" else np.int64)  # 1-based
        self.query_bounds, self.passage_bounds, self.num_negatives, self.task_ids = stats.arrays()
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        self._take_bad(bad)
        self.task = self.records_task()

    def where(self, i: int) -> str:
        return f"{self.path}:{int(self.line_numbers[i])}"

    def records(self, ids: Sequence[int]) -> list[Record]:
        """The records at positions `ids` among the file's good lines (thread-safe)."""
        return [parse_line(os.pread(self._fd, int(self._lengths[i]), int(self._offsets[i])),
                           self.record_format, self.columns) for i in ids]


class ArrowSource(Source):
    """A Parquet / Arrow dataset (arrow_tables): one memory-mapped table, its rows read with `take`.

    Opening reads every row once (parsed and validated as a JSONL line is; a null value is an absent key)
    to build the per-record arrays, one batch of rows at a time; a good record's row is kept only when
    some were skipped (8 bytes a record). `where(i)` is "path row n", n 1-based.
    """

    def __init__(self, name: str, path: str, files: Sequence[str], record_format: str = "auto",
                 skip_bad_records: bool = False, skip_hint: str = TRAINER_HINT, columns=None):
        super().__init__()
        from piccolo_jax.data import arrow_tables
        from piccolo_jax.data.jsonl_scan import check_record

        self.name, self.path, self.record_format, self.columns = name, path, record_format, columns
        self._table, self._reader = arrow_tables.open_table(files, with_reader=True)
        stats, bad, kept = record_arrays.RecordStats(), BadRecords(path), array("q")
        first: tuple[str, int] | None = None
        for row, obj in enumerate(arrow_tables.iter_rows(self._table)):
            try:
                record = record_from_json(obj, record_format, columns)
            except BadRecord as e:
                record = e
            record = check_record(record, self._where_row(row), first is None, name,
                                  bad if skip_bad_records else None, skip_hint)
            if record is None:
                continue
            if first is None:
                first = (record.task, row)
            elif record.task != first[0]:
                raise BadRecord(f"{self._where_row(row)}: a {record.task} record in a dataset of {first[0]} records "
                                f"(from {self._where_row(first[1])}): one dataset holds one task type (one loss)")
            kept.append(row)
            stats.add(record)
        self._kept = None if bad.count == 0 else np.frombuffer(kept, np.int64)  # good record -> table row
        self.query_bounds, self.passage_bounds, self.num_negatives, self.task_ids = stats.arrays()
        self._take_bad(bad)
        self.task = self.records_task()

    def _row(self, i: int) -> int:
        return int(self._kept[i]) if self._kept is not None else int(i)

    def _where_row(self, row: int) -> str:
        """"file row n" of table row `row` (0-based): the file holding it (its shard; for a hub dataset the
        file in the local snapshot), n from 1 within it (as prepared datasets name their records)."""
        file, n = self._reader.where(row)
        return f"{file} row {n}"

    def where(self, i: int) -> str:
        return self._where_row(self._row(i))

    def records(self, ids: Sequence[int]) -> list[Record]:
        """The records at positions `ids` among the dataset's good rows."""
        rows = [self._row(i) for i in ids]
        return [record_from_json(obj, self.record_format, self.columns) for obj in self._reader.rows(rows)]


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
        self.query_bounds, self.passage_bounds, self.num_negatives, self.task_ids = opened.arrays
        self._negatives_histogram = opened.negatives_histogram
        self._decode = tfds_store.decode_example
        self._line = tfds_store.example_line
        self._example = tfds_store._example_class()
        self._origin = opened.origin or tfds_store.Origin(opened.source or path)
        if opened.bad is not None:
            self._take_bad(opened.bad)
        self.check_one_task()
        self.task = self.records_task()

    def where(self, i: int) -> str:
        """"source.jsonl:line" of record i (the JSONL file it was prepared from), read from the record."""
        (raw,) = self._data.read([i])
        return self._origin.where(self._line(raw, self._example))

    def records(self, ids: Sequence[int]) -> list[Record]:
        """The records at positions `ids` (thread-safe: one lock per shard reader)."""
        return [self._decode(raw, self._example) for raw in self._data.read(ids)]


def open_sources(paths: Sequence[str], record_format: str = "auto", skip_bad_records: bool = False,
                 max_record_bytes: int = 1 << 20, skip_hint: str = TRAINER_HINT,
                 columns: Mapping[str, Mapping[str, str]] | None = None) -> list[Source]:
    """Open every dataset under `paths` (see discovery); dataset names must be unique. `columns` maps a
    dataset name to its column map (records.apply_columns); a map for no dataset opened is refused."""
    columns = dict(columns or {})
    sources: list[Source] = []
    for ref in find_datasets(paths):
        mapping = columns.get(ref.name)
        if ref.kind == "tfds":
            if mapping:
                raise ValueError(f"data.columns[{ref.name!r}]: {ref.path} is a prepared dataset (its records "
                                 "were mapped when it was prepared)")
            sources.append(TfdsSource(ref.path))
        elif ref.kind == "jsonl":
            sources.append(JsonlSource(ref.files[0], record_format, skip_bad_records, max_record_bytes, skip_hint,
                                       mapping, ref.name))
        else:
            sources.append(ArrowSource(ref.name, ref.path, ref.files, record_format, skip_bad_records, skip_hint,
                                       mapping))
    by_name: dict[str, str] = {}
    for source in sources:
        if source.name in by_name:
            raise ValueError(f"dataset name {source.name!r} is used by both {by_name[source.name]} and "
                             f"{source.path}; rename one")
        by_name[source.name] = source.path
    unused = sorted(set(columns) - set(by_name))
    if unused:
        raise ValueError(f"data.columns names {unused[0]!r}, which is not a dataset here (datasets: "
                         f"{sorted(by_name)})")
    return sources

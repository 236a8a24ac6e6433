"""Datasets on disk with random access: JSONL files and TFDS array_record directories.

Opening a JSONL file reads it once: every line is parsed and validated, the byte offsets of the good
ones are kept (8 + 4 bytes a record) and lines are read back on demand with `os.pread`. Each source also
holds three small per-record arrays the sampler needs for every row of a global batch without reading
its text: `query_bounds`, `passage_bounds` (the `char_token_bounds` of the query, and the largest over
its positives and negatives) and `num_negatives`.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Sequence

import numpy as np

from piccolo_jax.data.records import BadRecord, Record, parse_line
from piccolo_jax.tokenization import char_token_bounds

log = logging.getLogger(__name__)
_STATS_CHUNK = 4096  # records whose bounds are computed in one vectorised call
_MAX_REPORTED = 5  # bad-record messages kept per file for the report


class RecordStats:
    """Accumulates the per-record arrays (query_bounds, passage_bounds, num_negatives) in chunks."""

    def __init__(self):
        self._pending: list[Record] = []
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, record: Record) -> None:
        self._pending.append(record)
        if len(self._pending) >= _STATS_CHUNK:
            self._flush()

    def _flush(self) -> None:
        records, self._pending = self._pending, []
        if not records:
            return
        # query bound = bound(prompt) + bound(query); passage bound = max over positives + negatives.
        query = char_token_bounds([r.query for r in records]) + char_token_bounds(
            [r.prompt or "" for r in records])
        passages = [p for r in records for p in (*r.positives, *r.negatives)]
        owner = np.repeat(np.arange(len(records)), [len(r.positives) + len(r.negatives) for r in records])
        passage = np.zeros(len(records), np.int64)
        np.maximum.at(passage, owner, char_token_bounds(passages))
        negatives = np.array([len(r.negatives) for r in records], np.int64)
        self._parts.append((query, passage, negatives))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query_bounds, passage_bounds, num_negatives), each [N] int32."""
        self._flush()
        if not self._parts:
            return tuple(np.zeros(0, np.int32) for _ in range(3))
        return tuple(np.concatenate([p[i] for p in self._parts]).clip(max=2**31 - 1).astype(np.int32)
                     for i in range(3))


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

    def __len__(self) -> int:
        return len(self.query_bounds)

    def records(self, ids: Sequence[int]) -> list[Record]:
        raise NotImplementedError


class JsonlSource(Source):
    """One JSONL file = one dataset, named after the file stem."""

    def __init__(self, path: str, record_format: str = "auto", skip_bad_records: bool = False,
                 max_record_bytes: int = 1 << 20):
        super().__init__()
        self.path = path
        self.name = os.path.basename(path).rsplit(".", 1)[0]
        self.record_format = record_format
        offsets, lengths, line_numbers, stats = [], [], [], RecordStats()
        self.bad_records[path] = 0
        with open(path, "rb") as f:
            position, line_no = 0, 0
            while True:
                raw = f.readline(max_record_bytes + 1)
                if not raw:
                    break
                line_no += 1
                start, position = position, position + len(raw)
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                    raw, start = raw[3:], start + 3
                try:
                    if len(raw) > max_record_bytes and not raw.endswith(b"\n"):
                        while raw and not raw.endswith(b"\n"):  # skip the rest of the line unread
                            raw = f.readline(1 << 20)
                            position += len(raw)
                        raise BadRecord(f"line is {position - start:,} bytes, over max_record_bytes="
                                        f"{max_record_bytes:,}")
                    body = raw.rstrip(b"\r\n")
                    record = parse_line(body, record_format)
                except BadRecord as e:
                    message = f"{path}:{line_no}: {e}"
                    if not skip_bad_records:
                        raise BadRecord(message + " (set skip_bad_records to skip such records)") from None
                    self.bad_records[path] += 1
                    if len(self.bad_messages) < _MAX_REPORTED:
                        self.bad_messages.append(message)
                    continue
                offsets.append(start)
                lengths.append(len(body))
                line_numbers.append(line_no)
                stats.add(record)
        self._offsets = np.array(offsets, np.int64)
        self._lengths = np.array(lengths, np.int32)
        self.line_numbers = np.array(line_numbers, np.int64)  # 1-based line of each good record
        self.query_bounds, self.passage_bounds, self.num_negatives = stats.arrays()
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        if self.bad_records[path]:
            log.warning("%s: skipped %d bad records, e.g. %s", path, self.bad_records[path],
                        self.bad_messages[0])

    def records(self, ids: Sequence[int]) -> list[Record]:
        """The records at positions `ids` among the file's good lines (thread-safe)."""
        return [parse_line(os.pread(self._fd, int(self._lengths[i]), int(self._offsets[i])),
                           self.record_format) for i in ids]


class TfdsSource(Source):
    """A TFDS dataset written by scripts/prepare_data.py (array_record), read with random access."""

    def __init__(self, path: str, split: str = "train"):
        super().__init__()
        from piccolo_jax.data import tfds_store  # imports tensorflow_datasets

        self.path = path
        self.name, self._data, stats, bad = tfds_store.open_dataset(path, split)
        self.query_bounds, self.passage_bounds, self.num_negatives = stats
        self.bad_records.update(bad)
        self._lock = threading.Lock()

    def records(self, ids: Sequence[int]) -> list[Record]:
        from piccolo_jax.data import tfds_store

        with self._lock:  # the array_record reader is not documented as thread-safe
            items = self._data.__getitems__([int(i) for i in ids])
        return [tfds_store.to_record(item) for item in items]


def _is_tfds_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, "dataset_info.json"))


def find_dataset_paths(paths: Sequence[str]) -> list[str]:
    """Expand `paths` into dataset paths: a .jsonl file, a TFDS directory, or a directory holding those
    (JSONL files directly inside it, TFDS directories at any depth), in sorted order."""
    found: list[str] = []
    for path in paths:
        if os.path.isfile(path):
            if not path.endswith(".jsonl"):
                raise ValueError(f"{path}: unsupported dataset file (expected .jsonl)")
            found.append(path)
        elif os.path.isdir(path):
            if _is_tfds_dir(path):
                found.append(path)
                continue
            inside = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".jsonl"))
            for root, dirs, _ in os.walk(path):
                dirs.sort()
                inside += [os.path.join(root, d) for d in dirs if _is_tfds_dir(os.path.join(root, d))]
            if not inside:
                raise ValueError(f"{path}: no .jsonl files or TFDS datasets in this directory")
            found.extend(inside)
        else:
            raise FileNotFoundError(f"{path}: no such dataset file or directory")
    return found


def open_sources(paths: Sequence[str], record_format: str = "auto", skip_bad_records: bool = False,
                 max_record_bytes: int = 1 << 20) -> list[Source]:
    """Open every dataset under `paths`; dataset names must be unique."""
    sources: list[Source] = []
    for path in find_dataset_paths(paths):
        if os.path.isdir(path):
            sources.append(TfdsSource(path))
        else:
            sources.append(JsonlSource(path, record_format, skip_bad_records, max_record_bytes))
    by_name: dict[str, str] = {}
    for source in sources:
        if source.name in by_name:
            raise ValueError(f"dataset name {source.name!r} is used by both {by_name[source.name]} and "
                             f"{source.path}; rename one")
        by_name[source.name] = source.path
    return sources

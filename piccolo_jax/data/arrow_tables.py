"""Parquet and Arrow datasets as memory-mapped pyarrow tables: never read whole into memory.

* Arrow: a directory written by `datasets.Dataset.save_to_disk` (state.json names its `.arrow` files, in
  Arrow's IPC stream format) or an `.arrow` file (IPC stream or file format) is memory-mapped as it is:
  opening reads the schema and the batch offsets; rows are paged in from disk when they are read.
* Parquet is compressed by column chunk and cannot be memory-mapped. Its first opening converts it,
  one row group at a time (so at most one row group is held), into an Arrow IPC file in the data cache
  (`$PICCOLO_JAX_CACHE/arrow`, default `~/.cache/piccolo-jax/arrow`), named by a digest of the file's real
  path, size and modification time, and written under a temporary name then renamed: an interrupted
  conversion leaves no entry, a changed file gets a new one. Later openings memory-map the entry.

Several files of one dataset (Parquet shards, save_to_disk's `data-0000n-of-0000m.arrow`) are one table
(`pa.concat_tables`, zero-copy); their schemas must agree (the first that differs is named).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator, Sequence

import numpy as np

PARQUET_SUFFIX = ".parquet"
ARROW_SUFFIX = ".arrow"
_ROWS_PER_BATCH = 65_536  # rows converted from Parquet at a time (at most one row group is read at once)


def is_parquet(path: str) -> bool:
    return str(path).lower().endswith(PARQUET_SUFFIX)


def data_cache_dir() -> str:
    """Where converted Parquet files are kept (module doc)."""
    root = os.environ.get("PICCOLO_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "piccolo-jax")
    return os.path.join(root, "arrow")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:  # a core dependency: only a broken install lacks it
        raise ImportError(f"reading Parquet / Arrow needs pyarrow ({e}); pip install pyarrow") from e
    return pa


def is_save_to_disk_dir(path: str) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` (one split)."""
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def is_dataset_dict_dir(path: str) -> bool:
    """A directory written by `datasets.DatasetDict.save_to_disk` (one subdirectory per split)."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json"))


def save_to_disk_files(path: str) -> list[str]:
    """The .arrow files of a save_to_disk directory, in the order of its state.json."""
    state_path = os.path.join(path, "state.json")
    try:
        with open(state_path, encoding="utf-8") as f:
            files = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{state_path}: not a datasets state file ({e})") from None
    out = [os.path.join(path, name) for name in files]
    for file in out:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: listed in {state_path} but missing")
    return out


def _map_arrow(path: str):
    """One .arrow file (IPC file or stream format), memory-mapped: a zero-copy pa.Table."""
    pa = _pyarrow()
    source = pa.memory_map(path, "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path}: not an Arrow IPC file ({e})") from None


def _cache_entry(path: str) -> str:
    st = os.stat(path)
    key = f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    return os.path.join(data_cache_dir(), hashlib.sha256(key).hexdigest()[:32] + ARROW_SUFFIX)


def parquet_as_arrow(path: str) -> str:
    """The Arrow IPC file holding `path`'s rows (module doc): converted on first use, then reused."""
    pa = _pyarrow()
    entry = _cache_entry(path)
    if os.path.isfile(entry):
        return entry
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    tmp = f"{entry}.tmp-{socket.gethostname()}-{os.getpid()}"  # hosts sharing the cache convert side by side
    try:
        parquet = pa.parquet.ParquetFile(path, pre_buffer=False)  # pre-buffering would hold the whole file
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a Parquet file ({e})") from None
    try:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, parquet.schema_arrow) as writer:
            for group in range(parquet.num_row_groups):  # one row group read at a time
                for batch in parquet.iter_batches(batch_size=_ROWS_PER_BATCH, row_groups=[group]):
                    writer.write_batch(batch)
        os.replace(tmp, entry)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return entry


def open_table(files: Sequence[str], with_reader: bool = False):
    """The rows of `files` (Parquet or Arrow, one dataset) as one memory-mapped pa.Table; with_reader:
    (table, RowReader) whose `where` names the file of a row."""
    pa = _pyarrow()
    tables = []
    for file in files:
        if is_parquet(file):
            tables.append(_map_arrow(parquet_as_arrow(file)))
        else:
            tables.append(_map_arrow(file))
    for file, table in zip(files[1:], tables[1:]):
        if not table.schema.equals(tables[0].schema):
            raise ValueError(f"{file}: its columns {table.schema.names} ({table.schema.types}) differ from "
                             f"{files[0]}'s {tables[0].schema.names} ({tables[0].schema.types})")
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    if with_reader:
        return table, RowReader(table, files, [t.num_rows for t in tables])
    return table


class RowReader:
    """Rows of a memory-mapped table by position, touching only the record batches that hold them
    (`Table.take` on a chunked table would copy every chunk: work and memory of the whole table per call).
    Thread-safe: the batches are immutable."""

    def __init__(self, table, files: Sequence[str] = (), file_rows: Sequence[int] = ()):
        self._batches = table.to_batches()
        self._ends = np.cumsum([b.num_rows for b in self._batches], dtype=np.int64)  # batch k: [end_k-1, end_k)
        self._files = tuple(files)
        self._file_ends = np.cumsum(np.asarray(file_rows, np.int64))

    def rows(self, ids: Sequence[int]) -> list[dict]:
        """The rows at positions `ids` (in that order) as dicts, with null values left out (Parquet has no
        absent keys: a JSONL record without "text_neg" is a null in its Parquet column)."""
        ids = np.asarray(ids, np.int64)
        which = np.searchsorted(self._ends, ids, side="right")  # the batch holding each id
        out: list[dict | None] = [None] * len(ids)
        for k in np.unique(which):
            at = np.flatnonzero(which == k)
            start = self._ends[k] - self._batches[k].num_rows
            for i, row in zip(at, self._batches[k].take(ids[at] - start).to_pylist()):
                out[i] = present(row)
        return out

    def where(self, row: int) -> tuple[str, int]:
        """(file, 1-based row within that file) of table row `row` (0-based), for messages."""
        k = int(np.searchsorted(self._file_ends, row, side="right")) if len(self._files) > 1 else 0
        before = int(self._file_ends[k - 1]) if k else 0
        return (self._files[k] if self._files else ""), row - before + 1


def present(row: dict) -> dict:
    """A table row without its null values: a null is an absent key (RowReader.rows)."""
    return {key: value for key, value in row.items() if value is not None}


def iter_rows(table, batch_rows: int = 8192):
    """Every row of `table` in order (as `rows` gives them), one batch of rows in memory at a time."""
    for batch in table.to_batches(max_chunksize=batch_rows):
        for row in batch.to_pylist():
            yield present(row)


def is_table_input(path) -> bool:
    """Whether an input of `encode` / `mine` is a table (read here) rather than a text or JSONL file: a
    .parquet / .arrow file, a save_to_disk directory or a hub dataset (hf://datasets/...)."""
    path = str(path)
    return (path.lower().endswith((PARQUET_SUFFIX, ARROW_SUFFIX)) or path.startswith("hf://datasets/")
            or (os.path.isdir(path) and is_save_to_disk_dir(path)))


def open_input(path) -> tuple[str, object]:
    """("table", pa.Table) or ("jsonl", file path) of one table input (`is_table_input`); ValueError /
    FileNotFoundError naming it when it is not exactly one dataset."""
    from piccolo_jax.data.discovery import find_datasets

    refs = find_datasets([str(path)])
    if len(refs) != 1:
        raise ValueError(f"{path}: {len(refs)} datasets; name one file")
    if refs[0].kind == "jsonl":
        return "jsonl", refs[0].files[0]
    return "table", open_table(refs[0].files)


def table_texts(path, table, field: str, id_field: str | None = None, option: str = "--field"):
    """(id, text) of every row of `table`: the text in column `field`, the id in `id_field` or the 1-based
    row number. Raises ValueError("path row n: ...") for a null / non-string text or a bad id, and names
    the columns when `field` is not one."""
    for column, what in ((field, option), (id_field, "--id-field")):
        if column is not None and column not in table.column_names:
            raise ValueError(f"{path}: no column {column!r} ({what}); its columns: {', '.join(table.column_names)}")
    from piccolo_jax.io.text_files import document_id

    columns = [field] + ([id_field] if id_field else [])
    row = 0
    for batch in table.select(columns).to_batches(max_chunksize=8192):
        values = batch.to_pydict()
        for i, text in enumerate(values[field]):
            row += 1
            if not isinstance(text, str):
                raise ValueError(f"{path} row {row}: column {field!r} must be a string, got {type(text).__name__}")
            if id_field is None:
                yield str(row), text
                continue
            yield document_id(values[id_field][i], f"{path} row {row}", f"id column {id_field!r}"), text


def file_rows(path: str, lo: int, hi: int, batch_rows: int = 8192) -> Iterator[dict]:
    """Rows [lo, hi) of one Parquet / Arrow file as dicts (nulls left out, as RowReader.rows gives them),
    streamed: an Arrow file memory-mapped and sliced, a Parquet file decoded by the row groups the range
    touches, `batch_rows` rows at a time (prepare: each row read once, so not through the cache)."""
    pa = _pyarrow()
    if not is_parquet(path):
        yield from iter_rows(open_table([path]).slice(lo, hi - lo), batch_rows)
        return
    # pre_buffer=False and one row group a call: pyarrow's default (pre_buffer=True) reads ahead the column
    # chunks of every row group asked for, i.e. a whole shard (measured: 423 MB held for a 1 M-row file)
    parquet = pa.parquet.ParquetFile(path, pre_buffer=False)
    position = 0  # the file's row at the start of row group g
    for g in range(parquet.metadata.num_row_groups):
        n = parquet.metadata.row_group(g).num_rows
        if position < hi and position + n > lo:
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[g], use_threads=False):
                a, b = max(lo - position, 0), min(hi - position, batch.num_rows)
                position += batch.num_rows
                if a < b:
                    yield from iter_rows(pa.Table.from_batches([batch.slice(a, b - a)]), batch_rows)
                if position >= hi:
                    return
        else:
            position += n
        if position >= hi:
            break


def table_rows(files: Sequence[str], rows: Sequence[int], start: int, end: int, batch_rows: int = 8192
               ) -> Iterator[tuple[int, int, int, dict]]:
    """(table row, file index, row in that file, row as a dict) for rows [start, end) of a table whose
    files hold rows[i] rows each (rows counted from 0)."""
    offset = 0
    for i, (path, n) in enumerate(zip(files, rows)):
        lo, hi = max(start - offset, 0), min(end - offset, n)
        if lo < hi:
            for k, obj in enumerate(file_rows(path, lo, hi, batch_rows)):
                yield offset + lo + k, i, lo + k, obj
        offset += n

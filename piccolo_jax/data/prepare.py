"""Datasets -> TFDS array_record datasets, in parallel worker processes, reused while unchanged.

    outcomes = prepare(["data/"], "data/tfds", PrepareOptions(workers=16))   # `piccolo-jax prepare`

Inputs are the datasets `discovery.find_datasets` finds: JSONL files (also a hub dataset whose split is one
JSONL file) and Parquet / Arrow tables (a Parquet file, a group of Parquet shards `NAME-0000i-of-0000n.parquet`,
an .arrow file, a `datasets.Dataset.save_to_disk` directory, a hub dataset `hf://datasets/ORG/NAME...`).
TFDS directories among them are skipped with a warning. Each dataset becomes `OUT/<name>/1.0.0` with
<name> = tfds_name(dataset name), made in steps:

1. scan (a worker): for JSONL, size, mtime_ns and SHA-256 of the bytes (~1 GB/s), and the line boundaries
   that cut the file into shards; for a table, each file's size, mtime_ns, SHA-256 (a file of a hub
   snapshot is an immutable blob of the Hugging Face cache named by its hash: that name is taken
   unread) and row count (Parquet's footer, an Arrow file's batch index), its columns (all files of a
   table must agree), and row ranges [start, end) that cut the table's rows into shards;
2. reuse, when OUT/<name>/1.0.0/piccolo_source.json holds the same sizes, hashes and options (the column
   map included) and every file it lists is there with its size; a changed input or option is rebuilt,
   saying what changed;
3. convert (a worker per shard): the lines of bytes [start, end), or the rows [start, end), are parsed,
   validated, encoded into the shard's own array_record file, with that shard's part of the per-record
   arrays. Rows are streamed, never read whole: an Arrow file is memory-mapped and read in slices of
   _BATCH_ROWS rows; a Parquet file is decoded one row group at a time (`iter_batches` without pyarrow's
   pre-buffering), so at most one row group's column chunks and one batch of rows are held.
   Parquet is read in place, not converted into the trainer's Arrow cache (arrow_tables): each row is read
   once here, and a cached copy would be an uncompressed duplicate of the corpus;
4. install (this process): shards renamed in order, arrays merged and narrowed (record_arrays), TFDS
   metadata and piccolo_source.json written, the inputs' sizes and mtimes checked again, and the version
   directory renamed into place (an old one renamed aside first, then deleted).

A row of a table is read as a JSON object is (records.record_from_json: sentence-transformers' columns,
the column map `columns`), a null value being an absent key (arrow_tables.RowReader.rows). Each record stores where
it came from in its `line` feature: the line of a JSONL file, or the row of a table counted from 1 over
its files in order; tfds_store.Origin turns that into "file:line" or "file row N", N counted from 1
within that file (pyarrow's row index N - 1), for a table of several files naming the one holding it.
Bad records are named the same way ("file:line: reason", "file row N: reason").

All of it is built in OUT/.piccolo-tmp-<name>-<random>/ on the output's file system (see staging), so
a bad record, an error or Ctrl-C leaves the output as it was. A SIGKILL leaves that hidden directory
(discovery skips it with a warning); the next prepare into OUT deletes it, its lock being free. Bad
input raises PrepareError or BadRecord, one line each: two inputs with one dataset name (naming both),
an empty or all-bad input, a bad record without skip_bad_records (the earliest in the input), unknown
columns in an input's first record (records.UnknownSchema: the column map to set, with or without
skip_bad_records). Inputs finished before an error stay installed.

Shards: target = min(shard_bytes, max(8 MiB, total input bytes / workers)); an input of s bytes (a table:
the sum of its files' sizes) is cut into ceil(s / target) shards (a table: by equal row counts, at most
one shard a row), so one big file keeps every worker busy while a 400 M-record corpus (~180 GB of JSONL)
stays at ~180 shards of 1 GiB (one file descriptor and 32 KiB per shard reader). A shard that begins
inside a Parquet row group decodes that group's earlier rows once more (a fraction of one row group per
shard).
Cost: ~20 us of CPU per pretrain pair, all steps included (parse ~9, bounds ~2, encode ~5, zstd
write ~2; benchmarks/bench_data_scale.py measured 49,000-54,000 records per CPU-second on 5-10 M
records), so 16 workers convert ~800,000 records/s and 400 M records in ~9 minutes; Parquet / Arrow
rows: see benchmarks/bench_data_formats.py.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable, Sequence

import numpy as np

from piccolo_jax.data import arrow_tables, record_arrays, staging, tfds_store
from piccolo_jax.data.discovery import find_datasets
from piccolo_jax.data.jsonl_scan import CLI_HINT, BadRecords, check_record, scan_lines
from piccolo_jax.data.records import BadRecord, record_from_json

log = logging.getLogger(__name__)
MIN_SHARD_BYTES = 8 << 20
_BLOCK = 8 << 20  # bytes read at once while scanning
_BATCH_ROWS = 8192  # rows of a table read (and turned into Python objects) at once
_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # a Hugging Face cache blob's name: its etag (git / LFS hash)


class PrepareError(ValueError):
    """Bad input for prepare; str(e) is the one-line message."""


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    record_format: str = "auto"
    skip_bad_records: bool = False
    max_record_bytes: int = 1 << 20
    workers: int = 1  # worker processes (1 = all in this process)
    shard_bytes: int = 1 << 30  # most input bytes per shard
    skip_hint: str = CLI_HINT  # how the user skips bad records, quoted in the error
    columns: tuple[tuple[str, str], ...] = ()  # column map {our key: their column} for every input, as pairs

    def recorded(self, kind: str = "jsonl") -> dict:
        """The options that decide the content of a dataset of input `kind` (part of its fingerprint).
        The column map is recorded when one is set (datasets prepared without one stay reusable), and
        max_record_bytes only for JSONL (a table has no lines)."""
        out = {"record_format": self.record_format, "skip_bad_records": self.skip_bad_records}
        if kind == "jsonl":
            out["max_record_bytes"] = self.max_record_bytes
        if self.columns:
            out["columns"] = dict(self.columns)
        return out


@dataclasses.dataclass(frozen=True)
class Input:
    path: str  # as shown: the JSONL / Parquet / Arrow file, a shard group `dir/NAME-*.parquet`, a directory, a hub id
    name: str
    out: str  # OUT/<name>/1.0.0
    size: int  # bytes of its files
    kind: str = "jsonl"  # "jsonl" or "arrow" (a Parquet / Arrow table)
    files: tuple[str, ...] = ()  # its files (JSONL: the one file read)
    dataset: str = ""  # its name before tfds_name (what a column map is keyed by, named in messages)

    @property
    def file(self) -> str:
        return self.files[0] if self.files else self.path


@dataclasses.dataclass
class Outcome:
    path: str
    out: str
    action: str  # "built", "rebuilt" or "reused"
    reason: str  # why rebuilt or reused ("" when built new)
    records: int
    bad_records: int


def plan_inputs(inputs: Sequence[str], output: str) -> list[Input]:
    """The JSONL files and Parquet / Arrow tables under `inputs` (see discovery) with their dataset names;
    refuses two inputs that would write one dataset. TFDS directories among the inputs are skipped with a
    warning, and so is an input listed twice."""
    plan: list[Input] = []
    by_name: dict[str, str] = {}
    seen: dict[tuple[str, ...], str] = {}
    for ref in find_datasets(inputs):
        if ref.kind == "tfds":
            log.warning("skipping %s: already a TFDS dataset", ref.path)
            continue
        real = tuple(os.path.realpath(f) for f in ref.files)
        if real in seen:
            log.warning("skipping %s: the same %s as %s, listed twice", ref.path,
                        "file" if ref.kind == "jsonl" else "dataset", seen[real])
            continue
        seen[real] = ref.path
        name = tfds_store.tfds_name(ref.name)
        if name in by_name:
            raise PrepareError(f"{by_name[name]} and {ref.path} would both become dataset {name!r} in {output}; "
                               f"rename one")
        by_name[name] = ref.path
        plan.append(Input(ref.path, name, os.path.join(output, name, tfds_store.VERSION),
                          sum(os.path.getsize(f) for f in ref.files), ref.kind, tuple(ref.files), ref.name))
    if not plan:
        raise PrepareError(f"no JSONL, Parquet or Arrow datasets in {' '.join(inputs)}")
    return plan


def shard_target(total_bytes: int, options: PrepareOptions) -> int:
    """Input bytes per shard (see module doc)."""
    return max(1, min(options.shard_bytes, max(MIN_SHARD_BYTES, -(-total_bytes // options.workers))))


def shard_count(size: int, target: int) -> int:
    return max(1, math.ceil(size / target))


@dataclasses.dataclass(frozen=True)
class Scan:
    """A JSONL input, scanned."""

    size: int
    mtime_ns: int
    sha256: str
    lines: int
    shards: tuple[tuple[int, int, int], ...]  # (start, end, first line) of each shard

    def fingerprint(self) -> dict:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "sha256": self.sha256, "lines": self.lines}


def scan_input(path: str, target: int) -> Scan:
    """Hash `path` and cut it after the first newline at or past each multiple of size/ceil(size/target)."""
    stat = os.stat(path)
    size = stat.st_size
    count = shard_count(size, target)
    wanted = collections.deque(k * size // count for k in range(1, count))
    cuts, digest, newlines, block_start = [(0, 0)], hashlib.sha256(), 0, 0  # (offset, newlines before)
    last = b""
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
            while wanted and wanted[0] - 1 < block_start + len(block):
                at = block.find(b"\n", max(wanted[0] - 1 - block_start, 0))
                if at < 0:
                    break
                cut = block_start + at + 1
                cuts.append((cut, newlines + block.count(b"\n", 0, at + 1)))
                while wanted and wanted[0] <= cut:
                    wanted.popleft()
            newlines += block.count(b"\n")
            block_start += len(block)
            last = block[-1:]
    lines = newlines + (1 if last not in (b"", b"\n") else 0)
    bounds = [c for c in cuts if c[0] < block_start] + [(block_start, newlines)]
    shards = tuple((start, end, before + 1) for (start, before), (end, _) in zip(bounds, bounds[1:]))
    return Scan(block_start, stat.st_mtime_ns, digest.hexdigest(), lines, shards or ((0, 0, 1),))


@dataclasses.dataclass(frozen=True)
class TableFile:
    """One file of a Parquet / Arrow input: what its fingerprint holds."""

    path: str
    size: int
    mtime_ns: int
    sha256: str  # of its bytes, or "hub-blob:<name>" for an immutable blob of the Hugging Face cache
    rows: int


@dataclasses.dataclass(frozen=True)
class TableScan:
    """A Parquet / Arrow input, scanned."""

    files: tuple[TableFile, ...]
    shards: tuple[tuple[int, int], ...]  # (start, end) rows of the table (its files' rows in order)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def fingerprint(self) -> dict:
        return {"rows": self.rows, "inputs": [dataclasses.asdict(f) for f in self.files]}


def _content_id(path: str) -> str:
    """SHA-256 of a file's bytes; a Hugging Face cache blob (snapshots/<rev>/<file> links to blobs/<etag>,
    never rewritten in place) is identified by its name, unread."""
    real = os.path.realpath(path)
    if os.path.basename(os.path.dirname(real)) == "blobs" and _BLOB.fullmatch(os.path.basename(real)):
        return f"hub-blob:{os.path.basename(real)}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _table_schema(path: str):
    """(rows, pyarrow schema) of one Parquet / Arrow file, from its footer / batch index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if arrow_tables.is_parquet(path):
            metadata = pq.ParquetFile(path).metadata
            return metadata.num_rows, metadata.schema.to_arrow_schema()
        table = arrow_tables.open_table([path])
        return table.num_rows, table.schema
    except (pa.ArrowException, ValueError, OSError) as e:
        what = "Parquet" if arrow_tables.is_parquet(path) else "Arrow"
        raise PrepareError(f"{path}: not a readable {what} file ({str(e).splitlines()[0] if str(e) else e})") from None


def scan_table(files: Sequence[str], target: int) -> TableScan:
    """Fingerprint a table's files and cut its rows into ceil(bytes / target) ranges of equal size."""
    scanned, schemas = [], []
    for path in files:
        stat = os.stat(path)
        rows, schema = _table_schema(path)
        schemas.append(schema)
        scanned.append(TableFile(path, stat.st_size, stat.st_mtime_ns, _content_id(path), rows))
    for path, schema in zip(files[1:], schemas[1:]):
        if not schema.equals(schemas[0]):
            raise PrepareError(f"{path}: its columns {schema.names} ({schema.types}) differ from {files[0]}'s "
                               f"{schemas[0].names} ({schemas[0].types})")
    total = sum(f.rows for f in scanned)
    count = min(shard_count(sum(f.size for f in scanned), target), max(total, 1))
    cuts = [k * total // count for k in range(count + 1)]
    return TableScan(tuple(scanned), tuple(zip(cuts, cuts[1:])))


def _scan(inp: Input, target: int) -> Scan | TableScan:
    return scan_input(inp.file, target) if inp.kind == "jsonl" else scan_table(inp.files, target)


@dataclasses.dataclass(frozen=True)
class ShardJob:
    path: str  # JSONL: the file read; a table: the input's path (for messages)
    start: int  # JSONL: bytes; a table: rows of the table
    end: int
    first_line: int  # JSONL: the line number at `start`
    index: int
    directory: str  # where the shard's files go
    options: PrepareOptions
    kind: str = "jsonl"
    files: tuple[str, ...] = ()  # a table: its files
    rows: tuple[int, ...] = ()  # a table: the rows of each file
    dataset: str = ""  # a table: its dataset name (check_record)


@dataclasses.dataclass
class ShardResult:
    index: int
    records: int
    num_bytes: int
    bad: BadRecords
    low: tuple[int, int, int]  # smallest clipped value of each array
    high: tuple[int, int, int]  # largest
    histogram: dict[int, int]  # of num_negatives


def _part(directory: str, index: int, what: str) -> str:
    return os.path.join(directory, f"part-{index:05d}.{what}")


def _table_records(job: ShardJob, bad: BadRecords | None):
    """(row of the table counted from 1, Record) of the good rows of a table shard (check_record's account)."""
    o = job.options
    columns = dict(o.columns) or None
    first = job.start == 0  # until the table's first good record (check_record)
    for row, file, file_row, obj in arrow_tables.table_rows(job.files, job.rows, job.start, job.end,
                                                            _BATCH_ROWS):
        try:
            record = record_from_json(obj, o.record_format, columns)
        except BadRecord as e:
            record = e
        if check_record(record, f"{job.files[file]} row {file_row + 1}", first, job.dataset, bad,
                        o.skip_hint) is None:
            continue
        first = False
        yield row + 1, record


def _jsonl_records(job: ShardJob, bad: BadRecords | None):
    o = job.options
    with open(job.path, "rb") as f:
        for _, _, line, record in scan_lines(f, job.path, job.start, job.end, job.first_line, o.record_format,
                                             o.max_record_bytes, bad, o.skip_hint, columns=dict(o.columns) or None):
            yield line, record


def convert_shard(job: ShardJob) -> ShardResult:
    """Parse, validate and write one shard (runs in a worker process)."""
    o = job.options
    bad = BadRecords(job.path)
    writer, stats = tfds_store.ShardWriter(_part(job.directory, job.index, "array_record")), \
        record_arrays.RecordStats()
    read = _table_records if job.kind == "arrow" else _jsonl_records
    try:
        for line, record in read(job, bad if o.skip_bad_records else None):
            writer.write(record, line)
            stats.add(record)
    finally:
        num_bytes = writer.close()
    arrays = stats.clipped()
    for name, values in zip(record_arrays.ARRAY_NAMES, arrays):
        np.save(_part(job.directory, job.index, f"{name}.npy"), values)
    empty = writer.records == 0
    return ShardResult(job.index, writer.records, num_bytes, bad,
                       tuple(0 if empty else int(a.min()) for a in arrays),
                       tuple(0 if empty else int(a.max()) for a in arrays),
                       record_arrays.negatives_histogram(arrays[2]) if not empty else {})


def _input_changed(old: dict, scan: Scan | TableScan) -> str | None:
    """Why the input differs from the one a dataset was built from (its fingerprint `old`), or None."""
    if isinstance(scan, Scan):
        if "inputs" in old:
            return f"input changed: a table of {old['rows']} rows before, a JSONL file of {scan.lines} lines now"
        if (old["size"], old["sha256"]) == (scan.size, scan.sha256):
            return None
        return (f"input changed: {old['lines']} -> {scan.lines} lines, {old['size']} -> {scan.size} "
                f"bytes, sha256 {old['sha256'][:12]} -> {scan.sha256[:12]}")
    if "inputs" not in old:
        return f"input changed: a JSONL file of {old['lines']} lines before, a table of {scan.rows} rows now"
    before = [(f["size"], f["sha256"]) for f in old["inputs"]]
    now = [(f.size, f.sha256) for f in scan.files]
    if before == now:
        return None
    if len(before) != len(now):
        return f"input changed: {old['rows']} -> {scan.rows} rows, {len(before)} -> {len(now)} files"
    i = next(i for i, (a, b) in enumerate(zip(before, now)) if a != b)
    return (f"input changed: {old['rows']} -> {scan.rows} rows; {scan.files[i].path}: {before[i][0]} -> "
            f"{now[i][0]} bytes, sha256 {before[i][1][:12]} -> {now[i][1][:12]}")


def _unchanged(old: dict, scan: Scan | TableScan) -> str:
    """Why an unchanged input is reused (its size and hashes; a modification time that alone differs)."""
    if isinstance(scan, Scan):
        mtime = "" if old["mtime_ns"] == scan.mtime_ns else "; only its modification time differs"
        return f"input unchanged: {scan.lines} lines, sha256 {scan.sha256[:12]}{mtime}"
    touched = [f.path for f, o in zip(scan.files, old["inputs"]) if f.mtime_ns != o["mtime_ns"]]
    mtime = f"; only the modification time of {touched[0]}{' ...' if len(touched) > 1 else ''} differs" \
        if touched else ""
    files = f" in {len(scan.files)} files" if len(scan.files) > 1 else ""
    return f"input unchanged: {scan.rows} rows{files}, sha256 {scan.files[0].sha256[:12]}{mtime}"


def _reuse(inp: Input, scan: Scan | TableScan, options: PrepareOptions) -> tuple[bool, str]:
    """(whether the existing output can stay, why / why not)."""
    if not os.path.exists(inp.out):
        return False, ""
    meta = tfds_store.read_source_file(inp.out)
    if meta is None:
        return False, f"{tfds_store.SOURCE_FILE} missing"
    if meta.get("format") != tfds_store.FORMAT:
        return False, "written in an older layout"
    old = meta["fingerprint"]
    changed = _input_changed(old, scan)
    if changed:
        return False, changed
    recorded = options.recorded(inp.kind)
    if meta["options"] != recorded:
        keys = [*recorded, *(k for k in meta["options"] if k not in recorded)]
        changed = [f"{k} {meta['options'].get(k)!r} -> {recorded.get(k)!r}" for k in keys
                   if meta["options"].get(k) != recorded.get(k)]
        return False, "options changed: " + ", ".join(changed)
    for file, size in meta["files"].items():
        path = os.path.join(inp.out, file)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False, f"{file} missing or damaged"
    return True, _unchanged(old, scan)


def _merge_arrays(directory: str, parts: str, results: list[ShardResult], total: int) -> dict:
    """The shards' clipped arrays concatenated into narrowed piccolo_<name>.npy files; returns meta."""
    meta = {}
    for i, name in enumerate(record_arrays.ARRAY_NAMES):
        lo = min(r.low[i] for r in results if r.records)
        hi = max(r.high[i] for r in results if r.records)
        dtype = record_arrays.narrow_dtype(hi)
        if lo == hi:
            meta[name] = {"dtype": dtype.name, "constant": hi}
            continue
        out = np.lib.format.open_memmap(record_arrays.array_file(directory, name), "w+", dtype, (total,))
        at = 0
        for r in results:
            part = np.load(_part(parts, r.index, f"{name}.npy"), mmap_mode="r")
            out[at:at + len(part)] = part
            at += len(part)
        out.flush()
        del out
        meta[name] = {"dtype": dtype.name, "constant": None}
    return meta


def _install(inp: Input, scan: Scan | TableScan, results: list[ShardResult], tmp: str, reason: str,
             options: PrepareOptions) -> Outcome:
    results = sorted(results, key=lambda r: r.index)
    bad = BadRecords(inp.path)
    for r in results:
        bad.merge(r.bad)
    total = sum(r.records for r in results)
    if total == 0:
        if bad.count:
            raise PrepareError(f"{inp.path}: no good records, all {bad.count} are bad (e.g. {bad.messages[0]})")
        raise PrepareError(f"{inp.path}: empty file, no records" if inp.kind == "jsonl" else
                           f"{inp.path}: empty table, no rows")
    bad.log(log)
    version_dir, parts = os.path.join(tmp, inp.name, tfds_store.VERSION), os.path.join(tmp, "parts")
    os.makedirs(version_dir)
    kept = [r for r in results if r.records]
    files = {}
    for i, r in enumerate(kept):
        file = tfds_store.shard_file(inp.name, i, len(kept))
        os.rename(_part(parts, r.index, "array_record"), os.path.join(version_dir, file))
        files[file] = r.num_bytes
    arrays = _merge_arrays(version_dir, parts, kept, total)
    histogram: collections.Counter = collections.Counter()
    for r in kept:
        histogram.update(r.histogram)
    tfds_store.write_metadata(version_dir, inp.name, [r.records for r in kept], sum(files.values()),
                              f"piccolo-jax records converted from {os.path.basename(inp.path)}")
    mapped = [os.path.basename(record_arrays.array_file(version_dir, name))
              for name, entry in arrays.items() if entry["constant"] is None]
    for file in ("dataset_info.json", "features.json", *mapped):
        files[file] = os.path.getsize(os.path.join(version_dir, file))
    meta = {"format": tfds_store.FORMAT, "source": inp.path, "fingerprint": scan.fingerprint(),
            "options": options.recorded(inp.kind), "records": total, "bad_records": {inp.path: bad.count},
            "bad_messages": bad.messages, "arrays": arrays,
            "negatives_histogram": {str(k): v for k, v in sorted(histogram.items())}, "files": files}
    with open(os.path.join(version_dir, tfds_store.SOURCE_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    stamps = [(scan.size, scan.mtime_ns)] if isinstance(scan, Scan) else [(f.size, f.mtime_ns) for f in scan.files]
    for path, stamp in zip(inp.files or (inp.path,), stamps):
        stat = os.stat(path)
        if (stat.st_size, stat.st_mtime_ns) != stamp:
            raise PrepareError(f"{path}: changed while it was being converted; nothing written, run again")
    staging.replace_dir(version_dir, inp.out)
    return Outcome(inp.path, inp.out, "rebuilt" if reason else "built", reason, total, bad.count)


class _InlineExecutor(concurrent.futures.Executor):
    """Runs each job when submitted, in this process (workers = 1)."""

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(e)
        return future


def _executor(workers: int) -> concurrent.futures.Executor:
    if workers <= 1:
        return _InlineExecutor()
    # spawn: the parent may have imported JAX (multi-threaded), which must not be forked
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _jobs(inp: Input, scan: Scan | TableScan, directory: str, options: PrepareOptions) -> list[ShardJob]:
    if isinstance(scan, Scan):
        return [ShardJob(inp.file, start, end, first, k, directory, options)
                for k, (start, end, first) in enumerate(scan.shards)]
    rows = tuple(f.rows for f in scan.files)
    return [ShardJob(inp.path, start, end, 0, k, directory, options, "arrow", inp.files, rows, inp.dataset)
            for k, (start, end) in enumerate(scan.shards)]


def prepare(inputs: Sequence[str], output: str, options: PrepareOptions = PrepareOptions(),
            on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Convert (or reuse) every JSONL file and Parquet / Arrow table under `inputs` into `output`; see the
    module doc.

    `on_outcome` is called as each dataset is done (reused ones first). Returns the outcomes in input
    order; raises PrepareError / BadRecord / OSError on the first failure, after cleaning up.
    """
    plan = plan_inputs(inputs, output)
    target = shard_target(sum(i.size for i in plan), options)
    expected_shards = sum(shard_count(i.size, target) for i in plan)
    os.makedirs(output, exist_ok=True)
    staging.remove_stale(output)
    done: dict[str, Outcome] = {}
    report = on_outcome or (lambda outcome: None)
    temporaries: list[tuple[str, int]] = []  # (directory, descriptor holding its lock)
    workers = min(options.workers, expected_shards)
    pool = _executor(workers)
    try:
        scans = [pool.submit(_scan, i, target) for i in plan]
        todo = []
        for inp, future in zip(plan, scans):
            scan = future.result()
            reuse, reason = _reuse(inp, scan, options)
            if reuse:
                meta = tfds_store.read_source_file(inp.out)
                done[inp.path] = Outcome(inp.path, inp.out, "reused", reason, meta["records"],
                                         sum(meta["bad_records"].values()))
                report(done[inp.path])
            else:
                todo.append((inp, scan, reason))
        jobs: collections.deque = collections.deque()
        state = {}  # input path -> [input, scan, reason, tmp dir, shards left, results]
        for inp, scan, reason in todo:
            tmp, lock = staging.claim(output, inp.name)
            temporaries.append((tmp, lock))
            state[inp.path] = [inp, scan, reason, tmp, len(scan.shards), []]
            jobs.extend((inp.path, job) for job in _jobs(inp, scan, os.path.join(tmp, "parts"), options))
        order = {inp.path: n for n, inp in enumerate(plan)}
        errors: list[tuple[int, int, BaseException]] = []  # (input order, shard, error)
        running: dict[concurrent.futures.Future, tuple[str, ShardJob]] = {}
        while jobs or running:
            while jobs and not errors and len(running) <= workers:  # one queued behind the busy ones
                key, job = jobs.popleft()
                running[pool.submit(convert_shard, job)] = key, job
            if not running:
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                key, job = running.pop(future)
                entry = state[key]
                if future.exception() is not None:
                    errors.append((order[key], job.index, future.exception()))
                    continue
                entry[5].append(future.result())
                entry[4] -= 1
                if entry[4] == 0 and not any(e[0] == order[key] for e in errors):
                    inp, scan, reason, tmp = entry[:4]
                    try:
                        done[inp.path] = _install(inp, scan, entry[5], tmp, reason, options)
                    except Exception as e:  # noqa: BLE001 - reported like a failed shard
                        errors.append((order[key], len(scan.shards), e))
                        continue
                    report(done[inp.path])
        if errors:
            raise min(errors, key=lambda e: e[:2])[2]
        return [done[i.path] for i in plan]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for tmp, lock in temporaries:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(lock)

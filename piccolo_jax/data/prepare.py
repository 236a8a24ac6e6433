"""JSONL files -> TFDS array_record datasets, in parallel worker processes, reused while unchanged.

    outcomes = prepare(["data/"], "data/tfds", PrepareOptions(workers=16))   # `piccolo-jax prepare`

Each input file is one dataset, `OUT/<name>/1.0.0` with <name> = tfds_name(file stem), made in steps:

1. scan (a worker): size, mtime_ns and SHA-256 of the bytes (~1 GB/s), and the line boundaries that
   cut the file into shards;
2. reuse, when OUT/<name>/1.0.0/piccolo_source.json holds the same size, hash and options and every
   file it lists is there with its size; a changed input or option is rebuilt, saying what changed;
3. convert (a worker per shard): the lines of bytes [start, end) are parsed, validated, encoded into the
   shard's own array_record file, with that shard's part of the per-record arrays;
4. install (this process): shards renamed in order, arrays merged and narrowed (record_arrays), TFDS
   metadata and piccolo_source.json written, the input's size and mtime checked again, and the version
   directory renamed into place (an old one renamed aside first, then deleted).

All of it is built in OUT/.piccolo-tmp-<name>-<random>/ on the output's file system (see staging), so
a bad record, an error or Ctrl-C leaves the output as it was. A SIGKILL leaves that hidden directory
(discovery skips it with a warning); the next prepare into OUT deletes it, its lock being free. Bad input raises PrepareError or BadRecord, one line each: two
inputs with one dataset name (naming both), an empty or all-bad file, a bad record without
skip_bad_records (the earliest in the file). Inputs finished before an error stay installed.

Shards: target = min(shard_bytes, max(8 MiB, total input bytes / workers)); an input of s bytes is cut
into ceil(s / target) shards, so one big file keeps every worker busy while a 400 M-record corpus
(~180 GB of JSONL) stays at ~180 shards of 1 GiB (one file descriptor and 32 KiB per shard reader).
Cost: ~20 us of CPU per pretrain pair, all steps included (parse ~9, bounds ~2, encode ~5, zstd
write ~2; benchmarks/bench_data_scale.py measured 49,000-54,000 records per CPU-second on 5-10 M
records), so 16 workers convert ~800,000 records/s and 400 M records in ~9 minutes.
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
import shutil
from collections.abc import Callable, Sequence

import numpy as np

from piccolo_jax.data import record_arrays, staging, tfds_store
from piccolo_jax.data.discovery import find_dataset_paths, jsonl_stem
from piccolo_jax.data.jsonl_scan import CLI_HINT, BadRecords, scan_lines

log = logging.getLogger(__name__)
MIN_SHARD_BYTES = 8 << 20
_BLOCK = 8 << 20  # bytes read at once while scanning


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

    def recorded(self) -> dict:
        """The options that decide the content of a dataset (part of its fingerprint)."""
        return {"record_format": self.record_format, "skip_bad_records": self.skip_bad_records,
                "max_record_bytes": self.max_record_bytes}


@dataclasses.dataclass(frozen=True)
class Input:
    path: str
    name: str
    out: str  # OUT/<name>/1.0.0
    size: int


@dataclasses.dataclass
class Outcome:
    path: str
    out: str
    action: str  # "built", "rebuilt" or "reused"
    reason: str  # why rebuilt or reused ("" when built new)
    records: int
    bad_records: int


def plan_inputs(inputs: Sequence[str], output: str) -> list[Input]:
    """The JSONL files under `inputs` (see discovery) with their dataset names; refuses two inputs
    that would write one dataset. TFDS directories among the inputs are skipped with a warning."""
    plan: list[Input] = []
    by_name: dict[str, str] = {}
    seen: dict[str, str] = {}
    for path in find_dataset_paths(inputs):
        if os.path.isdir(path):
            log.warning("skipping %s: already a TFDS dataset", path)
            continue
        real = os.path.realpath(path)
        if real in seen:
            log.warning("skipping %s: the same file as %s, listed twice", path, seen[real])
            continue
        seen[real] = path
        name = tfds_store.tfds_name(jsonl_stem(path))
        if name in by_name:
            raise PrepareError(f"{by_name[name]} and {path} would both become dataset {name!r} in {output}; "
                               f"rename one")
        by_name[name] = path
        plan.append(Input(path, name, os.path.join(output, name, tfds_store.VERSION), os.path.getsize(path)))
    if not plan:
        raise PrepareError(f"no .jsonl files in {' '.join(inputs)}")
    return plan


def shard_target(total_bytes: int, options: PrepareOptions) -> int:
    """Input bytes per shard (see module doc)."""
    return max(1, min(options.shard_bytes, max(MIN_SHARD_BYTES, -(-total_bytes // options.workers))))


@dataclasses.dataclass(frozen=True)
class Scan:
    size: int
    mtime_ns: int
    sha256: str
    lines: int
    shards: tuple[tuple[int, int, int], ...]  # (start, end, first line) of each shard


def scan_input(path: str, target: int) -> Scan:
    """Hash `path` and cut it after the first newline at or past each multiple of size/ceil(size/target)."""
    stat = os.stat(path)
    size = stat.st_size
    count = max(1, math.ceil(size / target))
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
class ShardJob:
    path: str
    start: int
    end: int
    first_line: int
    index: int
    directory: str  # where the shard's files go
    options: PrepareOptions


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


def convert_shard(job: ShardJob) -> ShardResult:
    """Parse, validate and write one shard (runs in a worker process)."""
    o = job.options
    bad = BadRecords(job.path)
    writer, stats = tfds_store.ShardWriter(_part(job.directory, job.index, "array_record")), \
        record_arrays.RecordStats()
    try:
        with open(job.path, "rb") as f:
            for _, _, line, record in scan_lines(f, job.path, job.start, job.end, job.first_line,
                                                 o.record_format, o.max_record_bytes,
                                                 bad if o.skip_bad_records else None, o.skip_hint):
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


def _reuse(inp: Input, scan: Scan, options: PrepareOptions) -> tuple[bool, str]:
    """(whether the existing output can stay, why / why not)."""
    if not os.path.exists(inp.out):
        return False, ""
    meta = tfds_store.read_source_file(inp.out)
    if meta is None:
        return False, f"{tfds_store.SOURCE_FILE} missing"
    if meta.get("format") != tfds_store.FORMAT:
        return False, "written in an older layout"
    old = meta["fingerprint"]
    if (old["size"], old["sha256"]) != (scan.size, scan.sha256):
        return False, (f"input changed: {old['lines']} -> {scan.lines} lines, {old['size']} -> {scan.size} "
                       f"bytes, sha256 {old['sha256'][:12]} -> {scan.sha256[:12]}")
    if meta["options"] != options.recorded():
        changed = [f"{k} {meta['options'].get(k)!r} -> {v!r}" for k, v in options.recorded().items()
                   if meta["options"].get(k) != v]
        return False, "options changed: " + ", ".join(changed)
    for file, size in meta["files"].items():
        path = os.path.join(inp.out, file)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False, f"{file} missing or damaged"
    mtime = "" if old["mtime_ns"] == scan.mtime_ns else "; only its modification time differs"
    return True, f"input unchanged: {scan.lines} lines, sha256 {scan.sha256[:12]}{mtime}"


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


def _install(inp: Input, scan: Scan, results: list[ShardResult], tmp: str, reason: str,
             options: PrepareOptions) -> Outcome:
    results = sorted(results, key=lambda r: r.index)
    bad = BadRecords(inp.path)
    for r in results:
        bad.merge(r.bad)
    total = sum(r.records for r in results)
    if total == 0:
        if bad.count:
            raise PrepareError(f"{inp.path}: no good records, all {bad.count} are bad (e.g. {bad.messages[0]})")
        raise PrepareError(f"{inp.path}: empty file, no records")
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
    meta = {"format": tfds_store.FORMAT, "source": inp.path,
            "fingerprint": {"size": scan.size, "mtime_ns": scan.mtime_ns, "sha256": scan.sha256,
                            "lines": scan.lines},
            "options": options.recorded(), "records": total, "bad_records": {inp.path: bad.count},
            "bad_messages": bad.messages, "arrays": arrays,
            "negatives_histogram": {str(k): v for k, v in sorted(histogram.items())}, "files": files}
    with open(os.path.join(version_dir, tfds_store.SOURCE_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    stat = os.stat(inp.path)
    if (stat.st_size, stat.st_mtime_ns) != (scan.size, scan.mtime_ns):
        raise PrepareError(f"{inp.path}: changed while it was being converted; nothing written, run again")
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


def prepare(inputs: Sequence[str], output: str, options: PrepareOptions = PrepareOptions(),
            on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Convert (or reuse) every JSONL file under `inputs` into `output`; see the module doc.

    `on_outcome` is called as each dataset is done (reused ones first). Returns the outcomes in input
    order; raises PrepareError / BadRecord / OSError on the first failure, after cleaning up.
    """
    plan = plan_inputs(inputs, output)
    target = shard_target(sum(i.size for i in plan), options)
    expected_shards = sum(max(1, math.ceil(i.size / target)) for i in plan)
    os.makedirs(output, exist_ok=True)
    staging.remove_stale(output)
    done: dict[str, Outcome] = {}
    report = on_outcome or (lambda outcome: None)
    temporaries: list[tuple[str, int]] = []  # (directory, descriptor holding its lock)
    workers = min(options.workers, expected_shards)
    pool = _executor(workers)
    try:
        scans = [pool.submit(scan_input, i.path, target) for i in plan]
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
            jobs.extend(ShardJob(inp.path, start, end, first, k, os.path.join(tmp, "parts"), options)
                        for k, (start, end, first) in enumerate(scan.shards))
        order = {inp.path: n for n, inp in enumerate(plan)}
        errors: list[tuple[int, int, BaseException]] = []  # (input order, shard, error)
        running: dict[concurrent.futures.Future, ShardJob] = {}
        while jobs or running:
            while jobs and not errors and len(running) <= workers:  # one queued behind the busy ones
                job = jobs.popleft()
                running[pool.submit(convert_shard, job)] = job
            if not running:
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                entry = state[job.path]
                if future.exception() is not None:
                    errors.append((order[job.path], job.index, future.exception()))
                    continue
                entry[5].append(future.result())
                entry[4] -= 1
                if entry[4] == 0 and not any(e[0] == order[job.path] for e in errors):
                    inp, scan, reason, tmp = entry[:4]
                    try:
                        done[inp.path] = _install(inp, scan, entry[5], tmp, reason, options)
                    except Exception as e:  # noqa: BLE001 - reported like a failed shard
                        errors.append((order[job.path], len(scan.shards), e))
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

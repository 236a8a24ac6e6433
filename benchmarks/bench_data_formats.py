"""One corpus as JSONL, as Parquet and as a prepared TFDS dataset: open rate, prepare rate, loader rate and
peak memory of each (issue 19: "a 10 M-row Parquet corpus: prepare rate, loader rate and resident memory
against the same rows as JSONL and as a prepared TFDS dataset").

    python benchmarks/bench_data_formats.py                     # 10,000,000 rows: ~20 GB of disk
    python benchmarks/bench_data_formats.py --rows 1000000      # ~2 GB of disk, a few minutes on 2 cores

Data: bench_data_scale's pretrain pairs {"text", "text_pos"} (query 8..60, passage 30..200 characters of
the bundled vocabulary, ~455 bytes a JSONL line), written as one JSONL file, then the same rows as one
Parquet file of --row-group-rows rows a row group (pyarrow's defaults: snappy, dictionary encoding), then
the JSONL file prepared into TFDS. Every measurement runs in a fresh process of its own, so that its
peak memory (ru_maxrss of the process = VmHWM, resident pages of its own allocations *and* of the files
it memory-maps; RssAnon = its own allocations only) is not hidden by another format's:

* open: `open_sources([path])` as the trainer's first open. JSONL reads and validates every line and keeps
  16 bytes a record. Parquet's first open converts the file into the Arrow cache ($PICCOLO_JAX_CACHE/arrow,
  emptied before) and then reads and validates every row of the memory-mapped table to build the
  per-record arrays; the second open finds the conversion and only reads the rows. TFDS reads metadata.
* loader: `source.records(ids)` for --batches batches of 1,024 random ids in the opened source
  (records/s of wall time), what the sampler asks of a source per global batch (tokenising excluded).
* prepare: `prepare()` with --workers processes (JSONL: byte ranges; Parquet: row ranges of the file,
  streamed by row group); records/s of wall time and per CPU-second of all its processes (parent and
  workers); peak memory of the parent and of the largest worker.

Memory-mapped pages are counted while resident (page cache, reclaimable); the machine's page cache also
holds the freshly written files, so reads here do not wait for a cold disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_data_scale import du, generate, memory  # noqa: E402

BATCH = 1024


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def _maxrss(who: int) -> int:
    """ru_maxrss in bytes (Linux reports KiB)."""
    return resource.getrusage(who).ru_maxrss * 1024


def reset_peak() -> None:
    """Start VmHWM (peak resident memory) again from the current VmRSS (Linux >= 4.0), so that the peak of a
    phase is not the imports'."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ----------------------------------------------------------------------------------------------- data
def write_parquet(jsonl: str, parquet: str, row_group_rows: int) -> int:
    """The rows of `jsonl` as one Parquet file, streamed (row_group_rows rows read and written at a time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string()), ("text_pos", pa.string())])
    rows = 0
    with open(jsonl, encoding="utf-8") as f, pq.ParquetWriter(parquet, schema) as writer:
        while True:
            lines = [line for _, line in zip(range(row_group_rows), f)]
            if not lines:
                break
            objs = [json.loads(line) for line in lines]
            table = pa.table({"text": [o["text"] for o in objs], "text_pos": [o["text_pos"] for o in objs]},
                             schema=schema)
            writer.write_table(table, row_group_size=row_group_rows)
            rows += len(objs)
    return rows


# ------------------------------------------------------------------------------------- child phases
def child_open(path: str, batches: int) -> dict:
    """open_sources([path]), then random batches of records: seconds, rates and memory."""
    import numpy as np

    import tensorflow_datasets  # noqa: F401  (imported before the baseline by every format alike)
    from piccolo_jax.data import arrow_tables  # noqa: F401
    from piccolo_jax.data.sources import open_sources

    reset_peak()
    base = memory()
    start = time.perf_counter()
    (source,) = open_sources([path])
    open_s = time.perf_counter() - start
    opened = memory()
    n = len(source)
    rng = np.random.default_rng(0)
    source.records(rng.integers(0, n, BATCH))  # first touch (shard readers, table chunks)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        assert len(source.records(rng.integers(0, n, BATCH))) == BATCH
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"records": n, "open_s": open_s, "base": base, "opened": opened, "read": memory(),
            "reads_per_s": batches * BATCH / wall, "reads_per_cpu_s": batches * BATCH / cpu}


def child_prepare(path: str, output: str, workers: int) -> dict:
    """prepare([path]) with `workers` processes: seconds, CPU of all processes, peak memory."""
    import tensorflow_datasets  # noqa: F401  (what the parent imports anyway, before the baseline)
    from piccolo_jax.data.prepare import PrepareOptions, prepare

    reset_peak()
    base = memory()
    start, cpu = time.perf_counter(), time.process_time()
    (outcome,) = prepare([path], output, PrepareOptions(workers=workers))
    wall = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu + children.ru_utime + children.ru_stime
    return {"records": outcome.records, "seconds": wall, "cpu_s": cpu, "out": outcome.out, "base": base,
            "end": memory(), "children_maxrss": _maxrss(resource.RUSAGE_CHILDREN)}


def run_child(phase: str, env: dict | None = None, **kwargs) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", phase, json.dumps(kwargs)],
                       capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode:
        sys.exit(f"child {phase} {kwargs} failed:\n{r.stderr[-4000:]}")
    line = next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[7:])


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--row-group-rows", type=int, default=100_000, help="rows per Parquet row group")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="prepare workers")
    parser.add_argument("--batches", type=int, default=50, help="random read batches of 1,024")
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        phase, kwargs = args.child[0], json.loads(args.child[1])
        result = {"open": child_open, "prepare": child_prepare}[phase](**kwargs)
        print("RESULT " + json.dumps(result), flush=True)
        return
    n = args.rows
    work = args.dir or tempfile.mkdtemp(prefix="bench_data_formats-")
    os.makedirs(work, exist_ok=True)
    need = n * (455 + 200 + 460 + 2 * 360)  # JSONL, Parquet, Arrow cache, two TFDS datasets
    free = shutil.disk_usage(work).free
    print(f"{n:,} rows; work directory {work}: {_gb(free)} free, ~{_gb(need)} needed; "
          f"{len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.1f}")
    if need > 0.9 * free:
        sys.exit("not enough disk space; use fewer --rows")
    cache = os.path.join(work, "cache")
    env = {"PICCOLO_JAX_CACHE": cache}
    try:
        data = os.path.join(work, "data")
        os.makedirs(data, exist_ok=True)
        start = time.perf_counter()
        (jsonl,) = generate(data, n, 1)
        parquet = os.path.join(data, "pairs_pq.parquet")
        assert write_parquet(jsonl, parquet, args.row_group_rows) == n
        import pyarrow.parquet as pq

        groups = pq.ParquetFile(parquet).metadata.num_row_groups
        sizes = {"jsonl": os.path.getsize(jsonl), "parquet": os.path.getsize(parquet)}
        print(f"generated in {time.perf_counter() - start:.0f} s: JSONL {_gb(sizes['jsonl'])}, Parquet "
              f"{_gb(sizes['parquet'])} ({groups} row groups of {args.row_group_rows:,} rows)", flush=True)

        prepared = {}
        for kind, path in (("jsonl", jsonl), ("parquet", parquet)):
            prepared[kind] = run_child("prepare", env, path=path, output=os.path.join(work, f"tfds_{kind}"),
                                       workers=args.workers)
            assert prepared[kind]["records"] == n
            print(f"prepared {kind} in {prepared[kind]['seconds']:.0f} s", flush=True)
        sizes["tfds"] = du(os.path.dirname(prepared["jsonl"]["out"]))

        shutil.rmtree(cache, ignore_errors=True)
        opened = {}
        for label, path in (("jsonl", jsonl), ("parquet_first", parquet), ("parquet_second", parquet),
                            ("tfds", prepared["jsonl"]["out"])):
            opened[label] = run_child("open", env, path=path, batches=args.batches)
            assert opened[label]["records"] == n
            print(f"opened {label} in {opened[label]['open_s']:.0f} s", flush=True)
        sizes["arrow_cache"] = du(cache)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    def added(r: dict, mark: str, key: str = "VmHWM") -> str:
        return "+" + _mb(r[mark][key] - r["base"]["VmRSS" if key == "VmHWM" else key])

    def open_cells(r: dict) -> list[str]:
        return [f"{n / r['open_s']:,.0f} ({r['open_s']:,.1f} s)", f"{added(r, 'opened')} / {added(r, 'read')}",
                added(r, "read", "RssAnon"), f"{r['reads_per_s']:,.0f}"]

    def prepare_cells(r: dict | None) -> list[str]:
        if r is None:
            return ["-", "-"]
        return [f"{n / r['seconds']:,.0f} ({n / r['cpu_s']:,.0f} per CPU-s)",
                f"{added(r, 'end')} / {_mb(r['children_maxrss'])}"]

    header = ["format", "on disk", "open: records/s (s)", "peak RSS added: open / + reads", "RssAnon added",
              "loader: records/s", "prepare -> TFDS: records/s", "peak RSS prepare: parent added / worker"]
    rows = [
        ["JSONL", _gb(sizes["jsonl"]), *open_cells(opened["jsonl"]), *prepare_cells(prepared["jsonl"])],
        ["Parquet, first open (converts)", f"{_gb(sizes['parquet'])} + cache {_gb(sizes['arrow_cache'])}",
         *open_cells(opened["parquet_first"]), *prepare_cells(prepared["parquet"])],
        ["Parquet, second open", "", *open_cells(opened["parquet_second"]), *prepare_cells(None)],
        ["TFDS (prepared)", _gb(sizes["tfds"]), *open_cells(opened["tfds"]), *prepare_cells(None)],
    ]
    print(f"\n{n:,} pretrain pairs, {len(os.sched_getaffinity(0))} cores, prepare --workers {args.workers}, "
          f"loader = {args.batches} batches of {BATCH:,} random records; each row's open and prepare in processes "
          f"of their own; memory added over the process after its imports (base VmRSS "
          f"{_mb(opened['jsonl']['base']['VmRSS'])}); a worker's peak is whole (its imports included):\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

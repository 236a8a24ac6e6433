"""Data at scale: prepare, open and read a generated pretrain corpus from JSONL and from TFDS, per host,
extrapolated to piccolo's 400 M pairs; side by side with Hugging Face `datasets` (the JSON -> Arrow cache
that the PyTorch trainers uniem and FlagEmbedding load their data with).

    python benchmarks/bench_data_scale.py --records 20000000   # the issue's 20 M: ~17 GB of disk, ~1 h on 2 cores
    python benchmarks/bench_data_scale.py --records 5000000    # ~4.5 GB of disk
    python benchmarks/bench_data_scale.py --quick              # 200,000 records, about a minute

Data: piccolo stage-1 pairs {"text", "text_pos"} with bench_data's pretrain lengths (query 8..60,
passage 30..200 characters: Chinese characters of the bundled vocabulary in 2..8-character words, 30%
followed by punctuation, 5% English words), ~455 bytes a record, in --files JSONL files (datasets).

Each phase runs in a fresh process so that its memory is its own (VmRSS = RssAnon + RssFile, from
/proc/self/status; RssFile counts the pages of memory-mapped files, reclaimable page cache):

1. prepare: `piccolo-jax prepare --workers W`; wall seconds and the CPU seconds of all its processes,
   so records per CPU-second = per core. 16 cores: 16 x per core (the shards are independent; the
   parent's install step is in the measured CPU time).
2. open: `open_sources` over the JSONL files, over the prepared TFDS datasets, and `datasets.load_dataset`
   from its Arrow cache: wall seconds and the memory added (bytes a record).
3. read: batches of 1,024 random records, records per CPU-second; memory after reading (the TFDS shard
   readers' index), then after touching every page of the per-record arrays (the worst case of a long run).
4. loader (JSONL and TFDS): pretrain batches of 1,024 pairs, 128 / 128 tokens, one worker thread:
   tokenised pairs per CPU-second of the process (all threads, the Rust tokenizer's included), and what
   the loader adds on top of the sources (the sampler's permutation of each dataset).

400 M extrapolation: measured base + (measured - base) x 400 M / N, time x 400 M / N. Both are upper
bounds for TFDS, whose opening reads metadata only (its cost grows with shards, not records).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TOKENIZER_DIR = os.path.join(REPO, "assets", "tokenizer")
TARGET = 400_000_000
ENGLISH = ["GPU", "Python", "model", "embedding", "2024", "Wi-Fi", "API", "BERT", "3.14", "USB-C"]
BATCH = 1024


# ------------------------------------------------------------------------------------------ helpers
def memory() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


# --------------------------------------------------------------------------------------- generation
def generate(directory: str, records: int, files: int, seed: int = 0) -> list[str]:
    """Write `records` pretrain pairs into `files` JSONL files; returns their paths."""
    with open(os.path.join(TOKENIZER_DIR, "vocab.txt"), encoding="utf-8") as f:
        chars = [t for t in (line.rstrip("\n") for line in f) if len(t) == 1 and "\u4e00" <= t <= "\u9fff"]
    rng = random.Random(seed)
    words, n = [], 0
    while n < 4_000_000:  # a pool of text that records are cut from
        if rng.random() < 0.05:
            word = " " + rng.choice(ENGLISH) + " "
        else:
            word = "".join(rng.choices(chars, k=rng.randint(2, 8)))
            if rng.random() < 0.3:
                word += rng.choice("，。、；：！？")
        words.append(word)
        n += len(word)
    pool = "".join(words)
    paths = []
    for d in range(files):
        path = os.path.join(directory, f"pairs{d}.jsonl")
        count = records // files + (d < records % files)
        with open(path, "w", encoding="utf-8") as f:
            for start in range(0, count, 100_000):
                lines = []
                for _ in range(min(100_000, count - start)):
                    q, p = rng.randint(8, 60), rng.randint(30, 200)
                    a, b = rng.randrange(len(pool) - q), rng.randrange(len(pool) - p)
                    lines.append(f'{{"text": "{pool[a:a + q]}", "text_pos": "{pool[b:b + p]}"}}\n')
                f.write("".join(lines))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------ child phases
def child_open(kind: str, paths: list[str], batches: int, loader: bool) -> dict:
    """open + read (+ loader) in this fresh process; returns the figures.

    JSONL and TFDS datasets are opened one after the other, and read and touched first in dataset 0
    only, then in all: two points per stage, so that a fixed cost is not taken for a per-record one.
    """
    import numpy as np

    from piccolo_jax.data.sources import open_sources

    if kind == "hf":
        import datasets
    else:
        import tensorflow_datasets  # noqa: F401  (imported before the baseline, as the sources need it)
    out = {"base": memory(), "opened": [], "open_s": [], "sizes": []}
    rng = np.random.default_rng(0)
    if kind == "hf":  # Arrow tables of the first file, then of all files (each converted before)
        tables = []
        for files in (paths[:1], paths):
            start = time.perf_counter()
            tables.append(datasets.load_dataset("json", data_files=files, split="train",
                                                cache_dir=os.environ["BENCH_HF_CACHE"]))
            out["open_s"].append(time.perf_counter() - start)
            out["opened"].append(memory())
        out["sizes"] = [len(tables[0]), len(tables[1]) - len(tables[0])]
        out["read"] = []
        wall, cpu = time.perf_counter(), time.process_time()
        for ds in tables:
            for _ in range(batches):
                assert len(ds[rng.integers(0, len(ds), BATCH).tolist()]["text"]) == BATCH
            out["read"].append(memory())
        out["read_per_s"] = 2 * batches * BATCH / (time.perf_counter() - wall)
        out["read_per_cpu_s"] = 2 * batches * BATCH / (time.process_time() - cpu)
        return out
    sources = []
    for path in paths:
        start = time.perf_counter()
        sources += open_sources([path])
        out["open_s"].append(time.perf_counter() - start)
        out["opened"].append(memory())
        out["sizes"].append(len(sources[-1]))
    out["read"], out["touched"] = [], []
    wall, cpu = time.perf_counter(), time.process_time()
    for group in (sources[:1], sources):
        for b in range(batches):
            source = group[b % len(group)]
            assert len(source.records(rng.integers(0, len(source), BATCH))) == BATCH
        out["read"].append(memory())
    out["read_per_s"] = 2 * batches * BATCH / (time.perf_counter() - wall)
    out["read_per_cpu_s"] = 2 * batches * BATCH / (time.process_time() - cpu)
    for group in (sources[:1], sources):  # every page of the per-record arrays (what a long run touches)
        for s in group:
            for name in ("query_bounds", "passage_bounds", "num_negatives"):
                int(np.asarray(getattr(s, name)).sum())
        out["touched"].append(memory())
    if loader:
        out.update(child_loader(sources))
    return out


def child_loader(sources) -> dict:
    from piccolo_jax.config import DataConfig
    from piccolo_jax.data.loader import Loader
    from piccolo_jax.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(TOKENIZER_DIR)
    cfg = DataConfig(global_batch_size=BATCH, num_negatives=0, query_max_length=128, passage_max_length=128,
                     num_workers=1, prefetch=2)
    before = memory()
    start = time.perf_counter()
    loader = Loader(cfg, tokenizer, sources)
    next(loader)  # plans (permutes) and builds the first batch
    first_s = time.perf_counter() - start
    after_first = memory()
    steps, wall, cpu = 12, time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(loader)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # the sampler's cached permutation of each dataset used so far (8 bytes a record, np.int64)
    perms = list(loader.sampler._perm_cache.values())
    perm_bytes = sum(p.nbytes for _, p in perms) / max(1, sum(len(p) for _, p in perms))
    loader.close()
    return {"loader_first_s": first_s, "loader_before": before, "loader_after": after_first,
            "pairs_per_s": steps * BATCH / wall, "pairs_per_cpu_s": steps * BATCH / cpu,
            "permutation_bytes_per_record": perm_bytes}


def child_hf_convert(paths: list[str], workers: int) -> dict:
    """HF datasets' JSON -> Arrow conversion of all files (timed), then of the first alone (for the
    two-point memory figures of the open phase)."""
    import datasets

    load = lambda files: datasets.load_dataset(  # noqa: E731
        "json", data_files=files, split="train", cache_dir=os.environ["BENCH_HF_CACHE"],
        num_proc=workers if workers > 1 else None)
    start = time.perf_counter()
    records = len(load(paths))
    seconds = time.perf_counter() - start
    load(paths[:1])
    return {"seconds": seconds, "records": records}


def run_child(*args: str, env: dict | None = None) -> tuple[dict, float, float]:
    """(figures, wall seconds, CPU seconds of the child and its descendants)."""
    cpu, wall = children_cpu(), time.perf_counter()
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    wall, cpu = time.perf_counter() - wall, children_cpu() - cpu
    if r.returncode:
        sys.exit(f"child {args[0]} failed:\n{r.stderr[-4000:]}")
    line = next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[7:]), wall, cpu


# ----------------------------------------------------------------------------------------- report
def two_point(first: float, last: float, n_first: int, n_last: int) -> tuple[float, float]:
    """(fixed, per record) of a cost measured after n_first and after n_last records."""
    if n_last == n_first:
        return 0.0, (last - first) / n_last
    per = (last - first) / (n_last - n_first)
    return first - per * n_first, per


def report_open(label: str, r: dict) -> list[str]:
    """Lines of one source kind. Anonymous memory (RssAnon: what the process allocated) is split into
    fixed + per record by the two points; file-backed memory (RssFile: pages of memory-mapped files,
    reclaimable) grows with the pages touched and is bounded by the size of the mapped files."""
    base, n, n1 = r["base"], sum(r["sizes"]), r["sizes"][0]
    anon = lambda m: m["RssAnon"] - base["RssAnon"]  # noqa: E731
    file = lambda m: m["RssFile"] - base["RssFile"]  # noqa: E731
    lines = []

    def stage(name: str, marks: list[dict], extra: str = "") -> None:
        fixed, per = two_point(anon(marks[0]), anon(marks[-1]), n1, n)
        lines.append(f"{label:5s} {name:<18s} anon +{anon(marks[-1]) / 1e6:8,.1f} MB = {fixed / 1e6:6,.1f} MB + "
                     f"{per:6.2f} B/record -> 400 M: {gb(base['RssAnon'] + fixed + per * TARGET):>8s}; "
                     f"file pages +{file(marks[-1]) / 1e6:,.1f} MB{extra}")

    if label == "HF":  # the first call pays datasets' own start-up: count all of it per record (a bound)
        seconds, fixed_s, per_s = r["open_s"][-1], 0.0, r["open_s"][-1] / n
    else:
        seconds = sum(r["open_s"])
        fixed_s, per_s = two_point(r["open_s"][0], seconds, n1, n)
    lines.append(f"{label:5s} {'open time':<18s} {seconds:8.2f} s = {fixed_s:6.2f} s + {per_s * 1e6:6.3f} us/record "
                 f"-> 400 M: {fixed_s + per_s * TARGET:,.0f} s (base RSS {gb(base['VmRSS'])}: Python + imports)")
    stage("open", r["opened"])
    stage("random reads", r["read"], f" ({r['read_per_cpu_s']:,.0f} records per CPU-s, "
          f"{r['read_per_s']:,.0f}/s wall)")
    if r.get("touched"):
        t = r["touched"]
        per_file = (file(t[-1]) - file(t[0])) / (n - n1)
        lines.append(f"{label:5s} {'every array page':<18s} file pages +{file(t[-1]) / 1e6:,.1f} MB: "
                     f"{per_file:.2f} B/record -> 400 M: {gb(per_file * TARGET)} (the per-record arrays, "
                     f"memory-mapped: reclaimable page cache)")
    if "pairs_per_cpu_s" in r:
        added = r["loader_after"]["RssAnon"] - r["loader_before"]["RssAnon"]
        perm = r["permutation_bytes_per_record"]
        lines.append(f"{label:5s} {'loader':<18s} {r['pairs_per_cpu_s']:8,.0f} tokenised pretrain pairs per CPU-s "
                     f"({r['pairs_per_s']:,.0f}/s wall; target >= 3,000 per core); first batch "
                     f"{r['loader_first_s']:.2f} s; anon +{added / 1e6:,.0f} MB, of it the sampler's permutation "
                     f"{perm:.0f} B/record -> 400 M: {gb(perm * TARGET)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000_000)
    parser.add_argument("--files", type=int, default=4, help="JSONL files (datasets)")
    parser.add_argument("--quick", action="store_true", help="200,000 records in 2 files")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="prepare workers")
    parser.add_argument("--batches", type=int, default=40, help="random read batches of 1,024")
    parser.add_argument("--no-hf", action="store_true", help="leave out Hugging Face datasets")
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        phase, rest = args.child[0], json.loads(args.child[1])
        result = child_open(**rest) if phase == "open" else child_hf_convert(**rest)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.quick:
        args.records, args.files, args.batches = 200_000, 2, 20
    n = args.records
    work = args.dir or tempfile.mkdtemp(prefix="bench_data_scale-")
    os.makedirs(work, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = n * (455 + 360 + (0 if args.no_hf else 440 * (1 + 1 / args.files)))
    print(f"{n:,} records in {args.files} files; work directory {work}: {gb(free)} free, ~{gb(need)} needed; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    if need > 0.9 * free:
        sys.exit("not enough disk space; use fewer --records or --no-hf")
    try:
        jsonl_dir, tfds_dir = os.path.join(work, "jsonl"), os.path.join(work, "tfds")
        os.makedirs(jsonl_dir, exist_ok=True)
        start = time.perf_counter()
        paths = generate(jsonl_dir, n, args.files)
        size = du(jsonl_dir)
        print(f"generate  {time.perf_counter() - start:8.1f} s: JSONL {gb(size)} ({size / n:.0f} B/record)")

        cpu, wall = children_cpu(), time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "piccolo_jax", "prepare", "--output", tfds_dir, "--workers",
                            str(args.workers), jsonl_dir], capture_output=True, text=True)
        wall, cpu = time.perf_counter() - wall, children_cpu() - cpu
        if r.returncode:
            sys.exit(f"prepare failed:\n{r.stderr[-4000:]}")
        stored = du(tfds_dir)
        per_core = n / cpu
        print(f"prepare   {wall:8.1f} s with {args.workers} workers: {n / wall:,.0f} records/s, "
              f"{per_core:,.0f} records per CPU-s  ->  16 cores: {16 * per_core:,.0f} records/s "
              f"(target >= 50,000); 400 M on 16 cores: {TARGET / (16 * per_core) / 3600:.1f} h; "
              f"TFDS {gb(stored)} ({stored / n:.0f} B/record)")
        hf_cache = os.path.join(work, "hf_cache")
        env = {"BENCH_HF_CACHE": hf_cache, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        if not args.no_hf:
            h, wall, cpu = run_child("hf", json.dumps({"paths": paths, "workers": args.workers}), env=env)
            arrow = du(hf_cache)
            print(f"hf json   {wall:8.1f} s with num_proc {args.workers}: {n / wall:,.0f} records/s, "
                  f"{n / cpu:,.0f} records per CPU-s; Arrow cache {gb(arrow)} ({arrow / n:.0f} B/record)")

        lines = []
        for label, kind, where in (("JSONL", "jsonl", paths), ("TFDS", "tfds", None),
                                   *([] if args.no_hf else [("HF", "hf", paths)])):
            rest = {"kind": kind, "paths": where, "batches": args.batches, "loader": True}
            if kind == "tfds":
                rest["paths"] = [os.path.join(tfds_dir, os.path.basename(p)[:-6], "1.0.0") for p in paths]
            result, _, _ = run_child("open", json.dumps(rest), env=env)
            assert sum(result["sizes"]) == n, result["sizes"]
            lines += report_open(label, result)
        print(f"\nper host, {n:,} records measured -> {TARGET:,} extrapolated as base + fixed + per record x "
              f"400 M (fixed and per record from two points: the first dataset, then all {args.files}):")
        print("\n".join(lines))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""encode, evaluate and mine across 2 processes x 4 CPU devices on 127.0.0.1, against 1 process x 8 devices.

Each command runs as a user runs it on a cluster (`--coordinator 127.0.0.1:PORT --num-processes 2
--process-id I`, the same command in both processes, one output path on a shared disk); the reference is
the same command in one process over 8 devices. A tiny random BERT keeps the runs short; the two processes
and the reference run side by side. Plus the per-process split and the gather, checked on their own.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from trainer_cli import ROOT, env

ASSETS = ROOT / "assets"
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(model: Path, data: Path, out: Path, extra=lambda name: []) -> list[list[str]]:
    """encode (JSONL with ids and a blank line), evaluate (the bundled retrieval task, also at a Matryoshka
    width) and mine (window [2, 30)), each writing under `out`."""
    cli = [sys.executable, "-m", "piccolo_jax"]
    common = ["--model", str(model), "--tokens-per-batch", "1024"]
    return [
        [*cli, "encode", *common, "--input", str(data / "texts.jsonl"), "--field", "text", "--id-field",
         "_id", "--output", str(out / "texts.npy"), "--chunk-size", "150", "--no-progress", *extra("encode")],
        [*cli, "evaluate", *common, str(ASSETS / "eval" / "retrieval"), "--dims", "16", "--output",
         str(out / "eval.json"), *extra("evaluate")],
        [*cli, "mine", *common, "--input", str(data / "pairs.jsonl"), "--output", str(out / "mined.jsonl"),
         "--window", "2", "30", "--num-negatives", "3", "--no-progress", *extra("mine")],
    ]


def start_chain(cmds: list[list[str]], devices: int, log: Path) -> subprocess.Popen:
    """The commands one after the other in one shell (stopping at the first failure)."""
    script = " && ".join(shlex.join(c) for c in cmds)
    return subprocess.Popen(["sh", "-c", script], cwd=ROOT, env=env(devices=devices), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process output dir, two-process output dir, logs dir, seconds) after running every command."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("multihost_inference")
    model = root / "tiny-hf"
    cfg = transformers.BertConfig(vocab_size=21128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(model)
    for f in (ASSETS / "tokenizer").iterdir():
        shutil.copy2(f, model / f.name)
    data = root / "data"
    data.mkdir()
    texts = [json.loads(line)["text"] for line in open(ASSETS / "data" / "pretrain" / "city_facts.jsonl",
                                                       encoding="utf-8")][:300]
    with open(data / "texts.jsonl", "w", encoding="utf-8") as f:  # 2 to ~60 tokens, long and short mixed
        for i, t in enumerate(texts):
            f.write(json.dumps({"_id": f"t{i}", "text": t[: 2 + (i * 37) % 90]}, ensure_ascii=False) + "\n")
            if i == 100:
                f.write("\n")  # skipped and counted alike
    pairs = open(ASSETS / "data" / "finetune" / "city_qa.jsonl", encoding="utf-8").readlines()[:160]
    (data / "pairs.jsonl").write_text("".join(pairs), encoding="utf-8")

    one, two, logs = root / "one", root / "two", root / "logs"
    for d in (one, two, logs):
        d.mkdir()
    ports = {name: free_port() for name in ("encode", "evaluate", "mine")}
    flags = lambda i: lambda name: ["--coordinator", f"127.0.0.1:{ports[name]}", "--num-processes", "2",  # noqa: E731
                                    "--process-id", str(i)]
    t0 = time.monotonic()
    procs = [start_chain(commands(model, data, one), 8, logs / "single.log")]
    procs += [start_chain(commands(model, data, two, flags(i)), 4, logs / f"process-{i}.log") for i in range(2)]
    try:
        codes = [p.wait(TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    seconds = time.monotonic() - t0
    texts = {f.name: f.read_text() for f in logs.iterdir()}
    assert codes == [0, 0, 0], f"exit codes {codes}\n" + "\n".join(f"--- {k}\n{v[-4000:]}" for k, v in texts.items())
    return one, two, logs, seconds


def test_embeddings_equal_one_process(runs):
    one, two, _, seconds = runs
    ref, got = np.load(one / "texts.npy"), np.load(two / "texts.npy")
    assert ref.shape == got.shape == (300, 32)
    # Each device computes the very block it computes in one process over 8 devices: measured 0.0.
    assert float(np.max(np.abs(got - ref))) <= 1e-6
    assert (two / "texts.ids.txt").read_text() == (one / "texts.ids.txt").read_text()
    print(f"2 x 4 vs 1 x 8: max |diff| {np.max(np.abs(got - ref)):.1e}; all runs {seconds:.1f} s")


def test_metrics_equal_one_process(runs):
    one, two, _, _ = runs
    ref, got = (json.loads((d / "eval.json").read_text())["tasks"] for d in (one, two))
    assert sorted(ref) == sorted(got) == ["retrieval"]
    for name in ref:
        for block in ("metrics", "dims"):
            a, b = ref[name][block], got[name][block]
            flat_a = a if block == "metrics" else {f"{d}/{k}": v for d, m in a.items() for k, v in m.items()}
            flat_b = b if block == "metrics" else {f"{d}/{k}": v for d, m in b.items() for k, v in m.items()}
            assert flat_a.keys() == flat_b.keys()
            for k in flat_a:
                assert abs(flat_a[k] - flat_b[k]) <= 1e-6, (name, k, flat_a[k], flat_b[k])


def test_mined_lists_identical(runs):
    one, two, _, _ = runs
    ref = (one / "mined.jsonl").read_text(encoding="utf-8")
    assert (two / "mined.jsonl").read_text(encoding="utf-8") == ref
    assert len(ref.splitlines()) == 160 and all(len(json.loads(r)["text_neg"]) == 3 for r in ref.splitlines())


def test_only_process_0_writes_and_reports(runs):
    _, two, logs, _ = runs
    p0, p1 = (logs / "process-0.log").read_text(), (logs / "process-1.log").read_text()
    for line in ("encode: 300 texts", "1 blank line(s) skipped", "[retrieval]", "wrote ", "mine_negatives: 160"):
        assert line in p0 and line not in p1, line
    assert sorted(p.name for p in two.iterdir()) == ["eval.json", "mined.jsonl", "texts.ids.txt", "texts.npy"]


# ------------------------------------------------------------------------------------ split and gather
class _Device:
    def __init__(self, process_index: int):
        self.process_index = process_index


class _TwoProcessSharding:
    """A batch sharding over 8 devices of which devices 0-3 belong to process 0 and 4-7 to process 1."""

    def __init__(self, real):
        self.real = real

    def devices_indices_map(self, shape):
        return {_Device(d.id // 4): index for d, index in self.real.devices_indices_map(shape).items()}


@pytest.mark.parametrize("packed", [True, False])
def test_split_covers_every_text_once_and_gathers_in_input_order(packed, monkeypatch):
    import jax

    from piccolo_jax.inference.batching import (
        bucket_length,
        plan_batches,
        plan_packed_batches,
    )
    from piccolo_jax.inference.encoder import default_mesh
    from piccolo_jax.parallel import gather, sharding

    mesh = default_mesh("dp")
    assert sharding.data_parallel_size(mesh) == 8
    rng = np.random.default_rng(0)
    lengths_n = rng.integers(3, 200, size=1000)
    owners_n = np.full(len(lengths_n), -1)
    if packed:
        plans = plan_packed_batches(lengths_n, 4096, lambda n: bucket_length(n, 256), 8, None)
        for b in plans:  # result [S blocks, slots, D]: a text belongs to the process of its block
            owners = gather.owner_processes(_TwoProcessSharding(sharding.batch_sharding(mesh, 3)),
                                                 (b.blocks, b.num_slots, 4))
            assert np.all(owners_n[b.texts] == -1)
            owners_n[b.texts] = owners[b.block]
    else:
        for b in plan_batches(lengths_n, 4096, 256, 8):  # result [B rows, D]: a row's process
            owners = gather.owner_processes(_TwoProcessSharding(sharding.batch_sharding(mesh, 2)),
                                                 (b.num_rows, 4))
            assert np.all(owners_n[b.rows] == -1)
            owners_n[b.rows] = owners[:len(b.rows)]
    shares = gather.process_rows(owners_n, 2)
    together = np.concatenate(shares)
    assert sorted(together.tolist()) == list(range(len(lengths_n)))  # every text exactly once
    assert all(np.all(np.diff(s) > 0) for s in shares)  # each share in input order
    assert 0.3 < len(shares[0]) / len(lengths_n) < 0.7  # both processes do real work

    # The gather, both processes simulated in lockstep, in slices of 64 rows (several all-gathers).
    monkeypatch.setattr(gather, "GATHER_ROWS", 64)
    e_nd = rng.normal(size=(len(lengths_n), 5)).astype(np.float32)
    local = [np.where((owners_n == p)[:, None], e_nd, np.nan).astype(np.float32) for p in range(2)]
    sent: list[list[np.ndarray]] = [[], []]
    for p in range(2):  # record what each process sends
        gather.assemble_rows(local[p].copy(), owners_n, p, 2,
                                  lambda x, p=p: (sent[p].append(x.copy()), np.zeros((2, *x.shape), x.dtype))[1])
    assert len(sent[0]) == len(sent[1]) > 1
    for p in range(2):
        calls = iter(range(len(sent[0])))
        got = gather.assemble_rows(local[p], owners_n, p, 2,
                                        lambda x: np.stack([sent[0][(i := next(calls))], sent[1][i]]))
        np.testing.assert_array_equal(got, e_nd)  # exact copies, in input order
    assert jax.process_count() == 1 and gather.gather_rows(e_nd, owners_n) is e_nd


@pytest.mark.parametrize("victim", [1, 0])  # a worker dies; the coordinator dies
def test_a_dead_peer_stops_the_survivor(runs, victim, tmp_path):
    one, _, _, _ = runs
    model = one.parent / "tiny-hf"
    data = tmp_path / "many.txt"
    data.write_text("\n".join(f"第{i}条：" + "城市" * (i % 40) for i in range(2000)) + "\n", encoding="utf-8")
    port, procs, logs = free_port(), [], [tmp_path / f"process-{i}.log" for i in range(2)]
    for i in range(2):  # chunks of 50 texts: one all-gather per chunk, 40 of them
        cmd = [sys.executable, "-m", "piccolo_jax", "encode", "--model", str(model), "--input", str(data),
               "--output", str(tmp_path / "out.npy"), "--chunk-size", "50", "--no-progress",
               "--heartbeat-timeout", "5", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
               "--process-id", str(i)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(devices=4), stdout=open(logs[i], "w"),
                                      stderr=subprocess.STDOUT))
    survivor = 1 - victim
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while "[Gloo]" not in logs[victim].read_text():  # the first chunk's all-gather has run
            assert procs[victim].poll() is None and time.monotonic() < deadline, logs[victim].read_text()
            time.sleep(0.02)
        procs[victim].kill()
        t0 = time.monotonic()
        code = procs[survivor].wait(60)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    text = logs[survivor].read_text()
    assert code == 1 and elapsed < 30, (code, elapsed, text[-3000:])
    last = text.strip().splitlines()[-1]  # a lost collective, or the distributed service stopping the process
    assert last.startswith(f"piccolo-jax encode: error: process {survivor}: ") and "another process" in last, last
    assert "rerun the same command on every process" in last, last
    print(f"victim {victim}: survivor exit {code} after {elapsed:.1f} s: {last[:160]}")
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("many.txt", "process-0.log", "process-1.log"))
    # Nothing from the survivor; process 0 killed with -9 cannot remove its own temporary files.
    assert left == ([] if victim else [f".out.ids.txt.tmp-{procs[0].pid}", f".out.npy.tmp-{procs[0].pid}"]), left


def test_mteb_tasks_are_refused_across_processes():
    r = subprocess.run([sys.executable, "-m", "piccolo_jax", "evaluate", "--model", "m", "--mteb-tasks", "AFQMC",
                        "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0"], cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--mteb-tasks runs in one process" in r.stderr

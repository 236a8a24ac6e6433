"""A run whose work directory is a `gs://` URL, against a real GCS emulator started on 127.0.0.1.

The emulator is the PyPI package gcp-storage-emulator (in the test extra), started by the fixture and
stopped after the tests. The storage client (gcsfs) and tensorstore (Orbax's arrays) reach it through
STORAGE_EMULATOR_HOST. One API it lacks: it reports no object generation on reads (x-goog-generation),
which tensorstore's OCDBT format needs for its conditional writes; with an emulator the trainer therefore
writes one zarr array per tensor (`storage.ocdbt_supported`), real buckets use OCDBT (not run here).

Covered on gs://: train, kill -9 and resume exactly, SIGTERM saves and exits 0, the export written and
loaded back (Encoder.load of the gs:// run), a rerun of a finished run, a second trainer refused by the
lock, a missing bucket refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from trainer_cli import ROOT, cmd, losses, run

pytest.importorskip("gcsfs")
EMULATOR = shutil.which("gcp-storage-emulator") or os.path.join(os.path.dirname(sys.executable),
                                                                "gcp-storage-emulator")
CONSTANT = ["optim.schedule=\"constant\"", "optim.warmup_steps=0", "run.save_every=4"]
STEPS = 8  # checkpoints 4 and 8: each save to the emulator takes ~10 s (one object per tensor)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """(base URL of the emulator, environment for the trainer) with a bucket named `bkt`."""
    if not os.path.exists(EMULATOR):
        pytest.skip("gcp-storage-emulator is not installed (test extra)")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
    proc = subprocess.Popen([EMULATOR, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                             "--default-bucket", "bkt"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/bkt", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the emulator did not start"
            time.sleep(0.2)
    env = dict(os.environ, STORAGE_EMULATOR_HOST=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    yield url, env
    proc.terminate()
    proc.wait(30)


def _objects(url: str, prefix: str) -> list[str]:
    query = urllib.parse.urlencode({"prefix": prefix})
    items = json.loads(urllib.request.urlopen(f"{url}/storage/v1/b/bkt/o?{query}").read()).get("items", [])
    return [i["name"] for i in items]


def _read(url: str, name: str) -> bytes:
    return urllib.request.urlopen(f"{url}/download/storage/v1/b/bkt/o/{urllib.parse.quote(name, safe='')}"
                                  "?alt=media").read()


def _complete_steps(url: str, run: str) -> list[int]:
    names = _objects(url, f"{run}/checkpoints/")
    return sorted(int(n.split("/")[2]) for n in names if n.endswith("/commit_success.txt") and n.count("/") == 3)


def _losses(url: str, run: str) -> dict[int, float]:
    out = {}
    for line in _read(url, f"{run}/metrics.jsonl").decode().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = m["loss"]
    return out


def _ours(stderr: str) -> list[str]:
    """stderr without the storage clients' notes about missing cloud credentials (emulator only)."""
    noise = ("google_auth_provider", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "Could not determine bucket type")
    return [line for line in stderr.splitlines() if line.strip() and not any(n in line for n in noise)]


def _start(url_env, workdir: str, *sets, log=None):
    _, env = url_env
    return subprocess.Popen(cmd(workdir, *CONSTANT, *sets), cwd=ROOT, env=env, stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def _run(url_env, workdir: str, *sets, expect=0, timeout=600):
    _, env = url_env
    r = subprocess.run(cmd(workdir, *CONSTANT, *sets), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if expect is not None:
        assert r.returncode == expect, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("local")
    run(workdir, f"run.steps={STEPS}", *CONSTANT)
    return workdir


def test_kill_9_resume_export_and_reload_on_gs(gcs, local_reference, tmp_path):
    url, env = gcs
    log = tmp_path / "first.log"
    proc = _start(gcs, "gs://bkt/a", f"run.steps={STEPS}", log=open(log, "w"))
    try:
        deadline = time.monotonic() + 600

        def wait_for(done, what):
            while not done():
                assert proc.poll() is None, f"the trainer ended before {what}: " + log.read_text()[-3000:]
                assert time.monotonic() < deadline, what
                time.sleep(0.1)

        # The lock holds on object storage too: a second trainer on the same URL is refused (asked while the
        # first compiles, long before it can finish; the kill follows its first checkpoint at once, and its
        # next one takes a save of ~10 s).
        wait_for(lambda: "compiling the train step" in log.read_text(), "compiling")
        second = _run(gcs, "gs://bkt/a", f"run.steps={STEPS}", expect=2, timeout=300)
        assert "in use by another trainer" in second.stderr and f"pid {proc.pid}" in second.stderr
        wait_for(lambda: any(s >= 4 for s in _complete_steps(url, "a")), "checkpoint 4")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _complete_steps(url, "a")[-1] < STEPS, "finished before the kill"
    r = _run(gcs, "gs://bkt/a", f"run.steps={STEPS}")
    assert "resumed from gs://bkt/a/checkpoints/" in r.stdout and "taking over the stale lock" in r.stdout
    # Every step after the checkpoint is rerun; the metrics up to it were persisted with it.
    got, ref = _losses(url, "a"), losses(local_reference)
    steps = [json.loads(line)["step"] for line in _read(url, "a/metrics.jsonl").decode().splitlines()]
    assert steps == list(range(1, STEPS + 1)), steps  # each step once: the killed run's rows past it dropped
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [ref[s] for s in range(1, STEPS + 1)],
                               rtol=1e-6)
    assert json.loads(_read(url, "a/export/export.json"))["step"] == STEPS
    assert "a/.lock" not in _objects(url, "a/")
    # A finished run says so; the export loads back from the bucket and embeds as the local run's does.
    assert "run complete" in _run(gcs, "gs://bkt/a", f"run.steps={STEPS}").stdout
    probe = ("import numpy as np; from piccolo_jax import Encoder; "
             f"a = Encoder.load('gs://bkt/a').encode(['北京的气候', 'mixed 中英文']); "
             f"b = Encoder.load('{local_reference}').encode(['北京的气候', 'mixed 中英文']); "
             "print(float(np.abs(a - b).max()))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-6


def test_sigterm_saves_on_gs(gcs, tmp_path):
    url, _ = gcs
    proc = _start(gcs, "gs://bkt/term", "run.steps=100000", "run.save_every=100000",
                  log=open(tmp_path / "log", "w"))
    try:
        deadline = time.monotonic() + 600
        while "compiling the train step" not in (tmp_path / "log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(300) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = _complete_steps(url, "term")
    assert len(steps) == 1 and steps[0] >= 1
    assert "received signal 15" in _read(url, "term/train.log").decode()


def test_missing_bucket_is_one_line(gcs):
    t0 = time.monotonic()
    r = _run(gcs, "gs://no-such-bucket/run", "run.steps=2", expect=2, timeout=120)
    lines = _ours(r.stderr)
    assert len(lines) == 1 and "the bucket gs://no-such-bucket does not exist" in lines[0], r.stderr[-2000:]
    assert time.monotonic() - t0 < 60


@pytest.fixture
def in_process_gcs(gcs, monkeypatch):
    """This process's storage calls (`piccolo_jax.io.storage`) pointed at the emulator."""
    url, _ = gcs
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    return url


def test_copies_stream_in_pieces_both_ways(in_process_gcs, tmp_path, monkeypatch):
    from piccolo_jax.io import storage

    buffer = 64 << 10
    monkeypatch.setattr(storage, "COPY_BUFFER_BYTES", buffer)
    pieces = []
    real = storage.shutil.copyfileobj
    monkeypatch.setattr(storage.shutil, "copyfileobj",
                        lambda fin, fout, length: pieces.append(length) or real(fin, fout, length))
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    big = np.random.default_rng(0).bytes(16 * buffer + 123)  # larger than the buffer, not a multiple of it
    (src / "model.safetensors").write_bytes(big)
    (src / "sub" / "config.json").write_text('{"a": 1}')
    storage.copy_tree(src, "gs://bkt/streamed/model")  # local -> bucket
    assert _read(in_process_gcs, "streamed/model/model.safetensors") == big
    assert _read(in_process_gcs, "streamed/model/sub/config.json") == b'{"a": 1}'
    back = storage.local_copy("gs://bkt/streamed/model")  # bucket -> local cache
    assert (back / "model.safetensors").read_bytes() == big and (back / "sub" / "config.json").exists()
    assert pieces and set(pieces) == {buffer}  # every file went through the bounded buffer
    # a URL-to-URL copy streams too
    storage.copy_file("gs://bkt/streamed/model/model.safetensors", "gs://bkt/streamed/copy.bin")
    assert _read(in_process_gcs, "streamed/copy.bin") == big


def test_object_text_close_writes_lines_after_a_forced_flush(in_process_gcs):
    """close() writes what came after the last flush at once, however recent that flush was."""
    from piccolo_jax.io.storage import ObjectText

    text = ObjectText("gs://bkt/logs/train.log")
    text.write("line 1\n")
    text.flush(force=True)
    text.write("line 2\n")
    text.flush()  # within FLUSH_S of the last write: kept in memory
    assert _read(in_process_gcs, "logs/train.log") == b"line 1\n"
    text.close()
    assert _read(in_process_gcs, "logs/train.log") == b"line 1\nline 2\n"


def test_a_resumed_run_drops_the_metrics_past_its_checkpoint_on_gs(in_process_gcs):
    """On object storage metrics.jsonl is rewritten whole: the rows past the resumed step are gone from it
    before the run appends (`ObjectText` reads the object it continues), and a kept file is not rewritten."""
    from piccolo_jax.io.storage import ObjectText
    from piccolo_jax.training.metrics_log import drop_rows_after

    rows = [json.dumps({"loss": 1.0 / s, "step": s}) + "\n" for s in range(1, 7)]
    ObjectText("gs://bkt/resumed/metrics.jsonl").close()  # nothing buffered: nothing written
    assert drop_rows_after("gs://bkt/resumed/metrics.jsonl", 4) == 0  # no object yet
    text = ObjectText("gs://bkt/resumed/metrics.jsonl")
    text.write("".join(rows))
    text.close()
    assert drop_rows_after("gs://bkt/resumed/metrics.jsonl", 4) == 2
    assert _read(in_process_gcs, "resumed/metrics.jsonl").decode() == "".join(rows[:4])
    text = ObjectText("gs://bkt/resumed/metrics.jsonl")
    text.write('{"loss": 0.5, "step": 5}\n')
    text.close()
    assert _read(in_process_gcs, "resumed/metrics.jsonl").decode() == "".join(rows[:4]) + '{"loss": 0.5, "step": 5}\n'
    assert drop_rows_after("gs://bkt/resumed/metrics.jsonl", 5) == 0

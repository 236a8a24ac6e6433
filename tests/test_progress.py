"""What a user sees on an 80-column terminal: a compiling line before the first step, a progress line that
fits, log lines above it (never inside it). The trainer runs under a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

from trainer_cli import ROOT, cmd, env

from piccolo_jax.training.flops import peak_flops

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _run_in_terminal(args, columns: int = 80, timeout: float = 600) -> tuple[int, str]:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))  # rows, columns
    run_env = dict(env(), COLUMNS=str(columns), LINES="24", TERM="xterm")
    proc = subprocess.Popen(args, cwd=ROOT, env=run_env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(60), out.decode("utf-8", "replace")


def _screen_lines(raw: str) -> list[str]:
    """Every state a terminal line went through: split at newlines and carriage returns, escapes removed."""
    return [ANSI.sub("", part) for line in raw.split("\n") for part in line.split("\r")]


def test_progress_fits_80_columns_and_log_lines_stay_above_it(tmp_path):
    sets = [s for s in cmd(tmp_path / "w", "run.steps=12", "run.log_every=2", "run.progress_bar=true")]
    code, raw = _run_in_terminal(sets)
    assert code == 0, raw[-3000:]
    lines = [line for line in _screen_lines(raw) if line.strip()]
    bars = [line for line in lines if re.match(r"\s*\d+/12 \[", line)]
    assert bars and max(len(line) for line in bars) <= 80, max(bars, key=len)  # log lines may wrap
    compiling = next(i for i, line in enumerate(lines) if "compiling the train step" in line)
    first_bar = next(i for i, line in enumerate(lines) if re.match(r"\s*\d+/12 \[", line) and "loss" in line)
    assert compiling < first_bar
    assert any("(compiling)" in line for line in lines) and any("GFLOP/s" in line for line in lines)
    # A log line never shares a screen line with the bar: each INFO line starts at column 0 with its time.
    for line in lines:
        if " INFO " in line:
            assert re.match(r"\d\d:\d\d:\d\d INFO ", line), line


def test_peak_table_tells_the_parts_apart():
    """device_kind strings as JAX reports them; the PCIe and NVL H100s are not the SXM part."""
    cases = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
             "NVIDIA L4": 121e12, "NVIDIA L40S": 362e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
             "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "cpu": None}
    for kind, peak in cases.items():
        assert peak_flops(kind) == peak, kind

"""What a user sees on an 80-column terminal: a compiling line before the first step, a progress line that
fits, log lines above it (never inside it). The trainer runs under a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
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


# The trainer's command, with XLA's slow-compile alarm written to file descriptor 2 while the step compiles
# (what XLA's C++ logging does when a compile takes over two minutes) and a line of stderr after it.
NOISY_COMPILE = r"""
import os, sys
from piccolo_jax.training import compiling
compile_ahead = compiling.compile_ahead
def noisy(*args, **kwargs):
    os.write(2, b"E1207 22:16:00.123456   4242 slow_operation_alarm.cc:73] \n" + b"*" * 32 + b"\n"
             b"[Compiling module jit_flat] Very slow compile? If you want to file a bug, run with envvar "
             b"XLA_FLAGS=--xla_dump_to=/tmp/foo and attach the results.\n" + b"*" * 32 + b"\n")
    os.write(2, b"a line of stderr after the alarm\n")
    return compile_ahead(*args, **kwargs)
compiling.compile_ahead = noisy
from piccolo_jax.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""
DATASETS = ("city_facts", "paraphrase", "product_reviews")  # the bundled pretrain data


def test_progress_fits_80_columns_and_log_lines_stay_above_it(tmp_path):
    """Also: a short start-up (the details in train.log), the compile announced and shown on the bar until
    it is done, XLA's slow-compile alarm kept off the terminal, each metrics line naming its dataset."""
    args = cmd(tmp_path / "w", "run.steps=12", "run.log_every=2", "run.progress_bar=true")
    code, raw = _run_in_terminal([args[0], "-c", NOISY_COMPILE, *args[2:]])
    assert code == 0, raw[-3000:]
    lines = [line for line in _screen_lines(raw) if line.strip()]
    bars = [line for line in lines if re.match(r"\s*\d+/12 \[", line)]
    assert bars and max(len(line) for line in bars) <= 80, max(bars, key=len)  # log lines may wrap
    compiling = next(i for i, line in enumerate(lines) if "compiling the train step" in line)
    first_bar = next(i for i, line in enumerate(lines) if re.match(r"\s*\d+/12 \[", line) and "loss" in line)
    assert compiling < first_bar
    # Start-up: a few short lines, then the bar says "compiling" until the step is compiled.
    startup = [line.replace(str(tmp_path / "w"), "runs/w") for line in lines[:first_bar]
               if re.match(r"\d\d:\d\d:\d\d ", line)]  # widths as with a short --workdir
    assert len(startup) <= 9 and max(map(len, startup)) <= 100, "\n".join(startup)
    shown = [line for line in bars if "compil" in line]
    assert "compiling the train step" in shown[0] and any("compiled in" in line for line in shown), shown
    assert any("(warm-up)" in line for line in lines) and any("GFLOP/s" in line for line in lines)
    # Every metrics line names the dataset of the step whose loss it shows (shortened with … if need be).
    named = [line.strip() for line in bars if re.search(r"GFLOP/s|\(warm-up\)", line)]  # whole lines
    assert named and all(re.search(r"\], (" + "|".join(DATASETS) + r"): loss ", line) for line in named), named
    assert "Very slow compile" not in raw and "slow_operation_alarm" not in raw, raw[-3000:]
    assert "a line of stderr after the alarm" in raw  # stderr itself still reaches the terminal
    # A log line never shares a screen line with the bar: each INFO line starts at column 0 with its time.
    for line in lines:
        if " INFO " in line:
            assert re.match(r"\d\d:\d\d:\d\d INFO ", line), line
    log = (tmp_path / "w" / "train.log").read_text(encoding="utf-8")  # the details of the start-up
    for needle in ("compilation cache ", "tokenizer ", "attention (training)", "mesh (data=1, fsdp=1, tensor=1)",
                   "gradient caching 2 chunk(s)", "losses by task: retrieval", "memory: not checked",
                   "dataset city_facts: retrieval", "packing: per device and chunk",
                   "compiling the train step for retrieval batches", "train step ready in"):
        assert needle in log, needle
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 13, 2))
    for r in rows:  # the logged step's dataset, and the datasets of the window's two steps
        assert r["dataset"] in DATASETS and r["dataset"] in r["window_datasets"], r
        assert sum(r["window_datasets"].values()) == 2 and set(r["window_datasets"]) <= set(DATASETS), r


def test_the_bar_fits_a_long_dataset_name_and_the_log_line_names_it(monkeypatch, caplog):
    """In this process: a name too long for an 80-column bar is shortened with "…"; a log line (stdout not
    a terminal) keeps it whole."""
    import sys

    from piccolo_jax.training.progress import ProgressBar

    m = {"loss": 3.7, "accuracy": 0.5, "lr": 1e-4, "examples_per_s": 123.0, "gflops_per_s": 4.5}
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    bar = ProgressBar(12000, 0)
    try:
        bar.update(1200, m, dataset="a_dataset_with_a_rather_long_name_" * 2)
        line = str(bar._bar)
        assert len(line) <= 79 and re.search(r"\], a_dataset_with_a_r\w*…: loss 3.700 123 ex/s", line), line
        bar.update(2400, m, dataset="qa")  # the learning rate makes room for the name
        assert "], qa: loss 3.700 acc 0.50 123 ex/s 4.5 GFLOP/s" in str(bar._bar), str(bar._bar)
    finally:
        bar.close()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    with caplog.at_level("INFO"):
        ProgressBar(12000, 0).update(1200, m, dataset="a_dataset_with_a_rather_long_name")
    assert "step 1200/12000 a_dataset_with_a_rather_long_name: loss 3.700 acc 0.50 lr 1.0e-04" in caplog.text


def test_peak_table_tells_the_parts_apart():
    """device_kind strings as JAX reports them; the PCIe and NVL H100s are not the SXM part."""
    cases = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
             "NVIDIA L4": 121e12, "NVIDIA L40S": 362e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
             "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "cpu": None}
    for kind, peak in cases.items():
        assert peak_flops(kind) == peak, kind

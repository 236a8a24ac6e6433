"""What a run shows: a progress bar, metrics as JSONL and TensorBoard event files, FLOP / MFU estimates."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import jax
import numpy as np

from piccolo_jax.accelerators import peak_flops
from piccolo_jax.model_config import ModelConfig
from piccolo_jax.storage import ObjectText

log = logging.getLogger(__name__)

def peak_flops_per_device() -> float | None:
    """bf16 matmul peak of this run's devices (None on CPU or an unknown part): see accelerators.py."""
    return peak_flops(jax.devices()[0].device_kind)


def step_flops(cfg: ModelConfig, host_batch: dict, process_count: int, num_chunks: int) -> float:
    """Matmul FLOPs of one train step (all hosts), on padded shapes.

    Forward per sequence of length T: 2 T P_layers (P_layers = L (4 D^2 + 2 D F)) + 4 L T^2 D (scores
    and weighted sum). Backward is twice the forward; gradient caching adds one more forward: x3 or x4.
    """
    d, f, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    p_layers = n_layers * (4 * d * d + 2 * d * f)
    total = 0.0
    for key, mask in host_batch.items():
        if not key.endswith("attention_mask"):
            continue
        t = mask.shape[-1]
        rows = int(np.prod(mask.shape[:-1]))
        total += rows * (2 * t * p_layers + 4 * n_layers * t * t * d)
    return total * (3 if num_chunks == 1 else 4) * process_count


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl, and scalars to TensorBoard (tb/).

    On object storage metrics.jsonl is rewritten every 30 s and at the end (`storage.ObjectText`).
    """

    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = ObjectText(workdir / "metrics.jsonl") if enabled else None
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(workdir / "tb"))
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard event files (metrics.jsonl only)")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({k: v for k, v in metrics.items()}, sort_keys=True) + "\n")
        self._jsonl.flush()  # local: every line; object storage: at most every 30 s
        if self._tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):  # skipped steps: JSONL only
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def persist(self) -> None:
        """Write out what is buffered (object storage rewrites metrics.jsonl only every 30 s otherwise)."""
        if self._jsonl is not None:
            self._jsonl.flush(force=True)

    def close(self) -> None:
        try:
            if self._jsonl is not None:
                self._jsonl.close()
        finally:
            if self._tb is not None:
                self._tb.close()


_ACTIVE_BARS: list = []  # tqdm bars on screen; log lines are written above them


class _ConsoleHandler(logging.StreamHandler):
    """Log lines to stdout, printed above an active progress bar (tqdm.write) instead of into it."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _ACTIVE_BARS:
            return super().emit(record)
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging.StreamHandler does
            self.handleError(record)


def console_handler() -> logging.Handler:
    return _ConsoleHandler(sys.stdout)


class RunLogHandler(logging.Handler):
    """WORKDIR/train.log, appended locally; on object storage rewritten every 30 s and on close."""

    def __init__(self, path):
        super().__init__()
        self.text = ObjectText(path)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.text.write(self.format(record) + "\n")
            self.text.flush()
        except Exception:
            self.handleError(record)

    def flush_now(self) -> None:
        self.text.flush(force=True)

    def close(self) -> None:
        try:
            self.text.close()
        finally:
            super().close()


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


class ProgressBar:
    """Progress of the run on process 0, one line that fits the terminal (80 columns included):

        1200/12000 [1:02:03<9:18:27], loss 0.412 acc 0.91 lr 9.8e-05 1234 ex/s MFU 41%

    with a bar in front when the terminal has room (>= 110 columns). Metrics are loss, in-batch accuracy,
    learning rate, examples/s and MFU (GFLOP/s where the device's peak is unknown, e.g. a CPU); the first
    window includes compiling the step, so its rates read "(compiling)". When stdout is not a terminal
    (a log file, a batch job) the same line is logged at every `run.log_every` instead of a bar, with the
    packing efficiency (real / computed tokens) at its end when the run packs.
    """

    def __init__(self, total: int, initial: int, enabled: bool = True):
        import shutil

        self._bar, self._lines, self.total = None, False, total
        self._peak = peak_flops_per_device()
        if not enabled:
            return
        if not sys.stdout.isatty():
            self._lines = True
            return
        from tqdm import tqdm

        # COLUMNS, else the terminal's size, else 80 (a terminal that reports no size gets 80, not 0).
        columns = shutil.get_terminal_size((80, 24)).columns or 80
        fmt = ("train {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"
               if columns >= 110 else "{n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")
        self._bar = tqdm(total=total, initial=initial, unit="step", bar_format=fmt, file=sys.stdout, ncols=columns)
        _ACTIVE_BARS.append(self._bar)

    def describe(self, m: dict, first_window: bool) -> str:
        parts = [f"loss {m.get('loss', float('nan')):.3f}"]
        if "accuracy" in m:
            parts.append(f"acc {m['accuracy']:.2f}")
        parts.append(f"lr {m.get('lr', 0.0):.1e}")
        if first_window:
            parts.append("(compiling)")
        else:
            parts.append(f"{_rate(m['examples_per_s'])} ex/s")
            if self._peak:
                parts.append(f"MFU {m['gflops_per_s'] * 1e9 / (self._peak * jax.device_count()):.0%}")
            else:
                parts.append(f"{_rate(m['gflops_per_s'])} GFLOP/s")
        if self._lines and "packing_efficiency" in m:  # log lines only: the bar keeps to 80 columns
            parts.append(f"packed {m['packing_efficiency']:.0%}")
        return " ".join(parts)

    def update(self, step: int, m: dict, first_window: bool = False) -> None:
        if self._lines:
            log.info("step %d/%d %s", step, self.total, self.describe(m, first_window))
        if self._bar is None:
            return
        self._bar.set_postfix_str(self.describe(m, first_window), refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            _ACTIVE_BARS.remove(self._bar)
            self._bar = None

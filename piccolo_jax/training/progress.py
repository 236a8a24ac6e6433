"""What a run shows while it runs: log lines on the console (above an active bar), train.log, and the
progress bar / progress line."""

from __future__ import annotations

import logging
import sys

import jax

from piccolo_jax.io.storage import ObjectText
from piccolo_jax.training.flops import peak_flops_per_device

log = logging.getLogger(__name__)


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


class EarlyRecords(logging.Handler):
    """Keeps what a start logs before WORKDIR/train.log exists (the checks: skipped bad records, skipped
    files) so that `replay` writes it there once it does; the console has shown it already."""

    def __init__(self, limit: int = 10_000):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.limit:
            self.records.append(record)

    def replay(self, handler: logging.Handler) -> None:
        """Hand the kept records, with their own times, to `handler` alone (not to the console again)."""
        for record in self.records:
            if record.levelno >= handler.level:
                handler.handle(record)
        self.records.clear()


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

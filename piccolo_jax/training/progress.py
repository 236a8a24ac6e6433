"""What a run shows while it runs: log lines on the console (above an active bar), train.log, and the
progress bar / progress line.

The console gets a short start-up; train.log gets every detail. A record logged with `extra=FILE_ONLY`
goes to train.log alone, one with `extra=CONSOLE_ONLY` to the console alone, and one with
`extra=console("short text")` is written in full to train.log and as the short text on the console:

    log.info("mesh (data=8, fsdp=1, tensor=1) over 8 gpu device(s) ...", extra=FILE_ONLY)
    log.info("devices: 8 x H100 ... (process 0 of 2)", extra=console("devices: 8 x H100, zero1"))
"""

from __future__ import annotations

import logging
import sys

import jax

from piccolo_jax.io.storage import ObjectText
from piccolo_jax.training.flops import peak_flops_per_device

log = logging.getLogger(__name__)


_ACTIVE_BARS: list = []  # tqdm bars on screen; log lines are written above them
FILE_ONLY = {"console": False}  # `extra=` of a record for train.log only (details of the start-up)
CONSOLE_ONLY = {"file": False}  # `extra=` of a record for the console only (a summary of lines in train.log)


def console(text: str) -> dict:
    """`extra=` of a record that the console shows as `text` (train.log: the record's own message)."""
    return {"console": text}


def for_file(record: logging.LogRecord) -> bool:
    return getattr(record, "file", True) is not False


class _ConsoleHandler(logging.StreamHandler):
    """Log lines to stdout, printed above an active progress bar (tqdm.write) instead of into it; records
    marked FILE_ONLY are left out, those with a `console(...)` text shown as that text."""

    def emit(self, record: logging.LogRecord) -> None:
        shown = getattr(record, "console", True)
        if shown is False:
            return
        if isinstance(shown, str):
            record = logging.makeLogRecord({**record.__dict__, "msg": shown, "args": None, "console": True})
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
        if not for_file(record):
            return
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
        if len(self.records) < self.limit and for_file(record):
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

        1200/12000 [1:02:03<9:18:27], city_qa: loss 0.412 acc 0.91 1234 ex/s MFU 41%

    with a bar in front when the terminal has room (>= 110 columns). The line names the dataset of the
    step whose loss it shows (every batch comes from one dataset, and their losses differ: a swing of the
    loss from one line to the next is often the dataset changing); where the width is short, the learning
    rate, then the accuracy, make room for it (a long name is shortened with "…"). Metrics are loss,
    in-batch accuracy, learning rate, examples/s and MFU (GFLOP/s where the device's peak is unknown,
    e.g. a CPU); the first window includes the first run of each program (and compiling any not compiled
    ahead), so its rates read "(warm-up)". Before the first step, while the train step compiles, the line
    says so (`status`). When stdout is not a terminal (a log file, a batch job) the same line is logged at
    every `run.log_every` instead of a bar, with the packing efficiency (real / computed tokens) at its
    end when the run packs.
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
        self.columns = shutil.get_terminal_size((80, 24)).columns or 80
        fmt = ("train {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"
               if self.columns >= 110 else "{n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")
        self._bar = tqdm(total=total, initial=initial, unit="step", bar_format=fmt, file=sys.stdout,
                         ncols=self.columns)
        _ACTIVE_BARS.append(self._bar)

    def status(self, text: str) -> None:
        """A phase instead of metrics (the bar only; e.g. "compiling the train step"), shown at once."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.refresh()

    def describe(self, m: dict, first_window: bool, dataset: str | None = None, drop: tuple[str, ...] = ()) -> str:
        """The metrics of a line, after "dataset: " when given; `drop`: "lr" / "acc" left out (narrow bars)."""
        parts = [f"loss {m.get('loss', float('nan')):.3f}"]
        if "accuracy" in m and "acc" not in drop:
            parts.append(f"acc {m['accuracy']:.2f}")
        if "lr" not in drop:
            parts.append(f"lr {m.get('lr', 0.0):.1e}")
        if first_window:
            parts.append("(warm-up)")
        else:
            parts.append(f"{_rate(m['examples_per_s'])} ex/s")
            if self._peak:
                parts.append(f"MFU {m['gflops_per_s'] * 1e9 / (self._peak * jax.device_count()):.0%}")
            else:
                parts.append(f"{_rate(m['gflops_per_s'])} GFLOP/s")
        if self._lines and "packing_efficiency" in m:  # log lines only: the bar keeps to 80 columns
            parts.append(f"packed {m['packing_efficiency']:.0%}")
        text = " ".join(parts)
        return f"{dataset}: {text}" if dataset else text

    def _fitted(self, m: dict, first_window: bool, dataset: str | None) -> str:
        """describe() for the bar: the dataset's name whole where it fits the width, else the learning rate
        (then the accuracy) left out to make room for it, shortened with "…" as a last resort."""
        if not dataset:
            return self.describe(m, first_window)
        for drop in ((), ("lr",), ("lr", "acc")):
            text = self.describe(m, first_window, drop=drop)
            self._bar.set_postfix_str(text, refresh=False)
            room = self.columns - 1 - len(str(self._bar)) - 2  # tqdm keeps the last column free; ": "
            if room >= min(len(dataset), 12):
                break
        if room >= len(dataset):
            return f"{dataset}: {text}"
        return f"{dataset[:room - 1]}…: {text}" if room >= 5 else text

    def update(self, step: int, m: dict, first_window: bool = False, dataset: str | None = None) -> None:
        if self._lines:
            log.info("step %d/%d %s", step, self.total, self.describe(m, first_window, dataset))
        if self._bar is None:
            return
        before, self._bar.n = self._bar.n, step  # measured as the line will be shown
        text = self._fitted(m, first_window, dataset)
        self._bar.n = before
        self._bar.set_postfix_str(text, refresh=False)
        self._bar.update(step - before)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            _ACTIVE_BARS.remove(self._bar)
            self._bar = None

"""What a run shows: a progress bar, metrics as JSONL and TensorBoard event files, FLOP / MFU estimates."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

from piccolo_jax.io.storage import ObjectText, as_path, is_url

log = logging.getLogger(__name__)


def _summary_writer(url: bool = False):
    """tensorboardX.SummaryWriter, imported without what it would load for nothing (`lean_imports`).

    tensorboardX imports torch (only to recognise torch tensors, which nothing here logs: 3-4 s of
    every trainer start), boto3 and google-cloud-storage (for its own s3:// and gs:// event writers:
    0.8 s) at module level. Torch is hidden always; the storage clients only for a local work directory
    (`url` False), and a URL work directory after a local one in the same process reloads the writers.
    """
    from piccolo_jax.io.lean_imports import hidden

    with hidden("torch", *(() if url else ("boto3", "google.cloud.storage"))):
        from tensorboardX import SummaryWriter, record_writer
    if url and not record_writer.GCS_ENABLED:  # imported earlier for a local directory, storage hidden
        import importlib

        importlib.reload(record_writer)
    return SummaryWriter


def _kept(text: str, start: int) -> tuple[list[str], int]:
    """The lines of metrics.jsonl `text` a run resuming from step `start` keeps, and how many it drops:
    rows of steps after `start` (the interrupted run logged them after its last checkpoint, and this run
    logs them again) and lines that are not a whole JSON object (what a kill -9 leaves mid-line)."""
    kept, dropped = [], 0
    *whole, last = text.split("\n")  # lines end in "\n" only (str.splitlines would also split at \r, \x1c, ...)
    for line in [f"{w}\n" for w in whole] + ([last] if last else []):
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            row = None
        if not isinstance(row, dict) or (isinstance(row.get("step"), int) and row["step"] > start):
            dropped += 1
        else:
            kept.append(line)
    return kept, dropped


def drop_rows_after(path, start: int) -> int:
    """Make metrics.jsonl at `path` (local or URL) hold only what a run resuming from step `start` keeps
    (`_kept`); returns the number of lines dropped. The file is replaced whole: locally a temporary file
    renamed over it, on object storage one object write, so a kill leaves the old file or the new one."""
    path = as_path(path)
    if is_url(path):
        if not path.exists():
            return 0
        kept, dropped = _kept(path.read_text(encoding="utf-8"), start)
        if dropped:
            path.write_text("".join(kept), encoding="utf-8")
        return dropped
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            kept, dropped = _kept(f.read(), start)
    except FileNotFoundError:
        return 0
    if dropped:
        fd, tmp = tempfile.mkstemp(prefix=".metrics.jsonl.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.writelines(kept)
            os.chmod(tmp, path.stat().st_mode & 0o777)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dropped


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl, and scalars to TensorBoard (tb/).

    On object storage metrics.jsonl is rewritten every 30 s and at the end (`storage.ObjectText`).
    A run that starts from step `start` (its checkpoint) logs each later step once: the rows an interrupted
    run wrote past that step are dropped from metrics.jsonl first (`drop_rows_after`), and the TensorBoard
    writer is opened with purge_step=start+1, which tells TensorBoard to discard the older events of those
    steps.
    """

    def __init__(self, workdir: Path, enabled: bool = True, start: int = 0):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if not enabled:
            return
        dropped = drop_rows_after(workdir / "metrics.jsonl", start)
        if dropped:
            log.info("metrics.jsonl: dropped %d line(s) that the interrupted run wrote after step %d (logged "
                     "again by this run)", dropped, start)
        self._jsonl = ObjectText(workdir / "metrics.jsonl")
        try:
            self._tb = _summary_writer(is_url(workdir))(str(workdir / "tb"), purge_step=start + 1)
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



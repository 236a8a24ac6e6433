"""What a run shows: a progress bar, metrics as JSONL and TensorBoard event files, FLOP / MFU estimates."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from piccolo_jax.io.storage import ObjectText, is_url

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
                self._tb = _summary_writer(is_url(workdir))(str(workdir / "tb"))
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



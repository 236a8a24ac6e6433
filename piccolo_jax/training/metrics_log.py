"""What a run shows: a progress bar, metrics as JSONL and TensorBoard event files, FLOP / MFU estimates."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from piccolo_jax.io.storage import ObjectText

log = logging.getLogger(__name__)


def _summary_writer():
    """tensorboardX.SummaryWriter, imported without torch.

    tensorboardX imports torch at module level when it is installed, only to recognise torch tensors
    (which nothing here logs): 3-4 s added to every trainer start. Unless torch is already loaded, the
    import runs with torch hidden (tensorboardX then treats numpy arrays as its tensors), and torch stays
    importable afterwards.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
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
                self._tb = _summary_writer()(str(workdir / "tb"))
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



"""What a run shows: a progress bar, metrics as JSONL and TensorBoard event files, FLOP / MFU estimates."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np

from piccolo_jax.model_config import ModelConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per chip, by jax device_kind substring (for the MFU estimate).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


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
    """Appends one JSON object per logged step to metrics.jsonl, and scalars to TensorBoard (tb/)."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
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
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class ProgressBar:
    """tqdm bar with loss, accuracy, lr, examples/s, tokens/s and MFU (or GFLOP/s without a known peak)."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self._bar = None
        self._peak = peak_flops_per_device()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, m: dict) -> None:
        if self._bar is None:
            return
        post = {"loss": f"{m.get('loss', float('nan')):.4f}", "acc": f"{m.get('accuracy', float('nan')):.3f}",
                "lr": f"{m.get('lr', 0.0):.2e}", "ex/s": f"{m['examples_per_s']:.1f}",
                "tok/s": f"{m['tokens_per_s']:.0f}"}
        if self._peak:
            post["mfu"] = f"{m['gflops_per_s'] * 1e9 / (self._peak * jax.device_count()):.1%}"
        else:
            post["GFLOP/s"] = f"{m['gflops_per_s']:.1f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

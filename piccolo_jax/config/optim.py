"""OptimConfig: AdamW hyper-parameters and the learning-rate schedule (plain types, no JAX)."""

from __future__ import annotations

import dataclasses

SCHEDULES = ("linear", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters and the learning-rate schedule."""

    lr: float = 2e-5  # peak learning rate, reached at the end of warmup
    warmup_steps: int = 100  # linear warmup from 0 to lr
    schedule: str = "linear"  # decay after warmup: "linear" (to 0), "cosine" (to 0) or "constant"
    weight_decay: float = 0.01  # decoupled weight decay on kernels and embeddings only
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.999  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    clip_norm: float = 1.0  # clip gradients to this global L2 norm (0 = off)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.clip_norm < 0:
            raise ValueError(f"optim: lr must be > 0; warmup_steps, weight_decay, clip_norm >= 0 (got {self})")

"""LossConfig: the loss of each task type and how the global batch is processed (plain types, no JAX)."""

from __future__ import annotations

import dataclasses

LOSSES = ("in_batch", "hard_negative", "gte")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The loss of each task type (piccolo_jax.losses.hybrid), and how the global batch is processed."""

    kind: str = "in_batch"  # retrieval batches: "in_batch" (pretrain), "hard_negative" or "gte" (finetune)
    temperature: float = 0.01  # retrieval: logits = cosine / temperature (piccolo v2 / M3E: 0.01)
    block_size: int = 512  # loss rows per block: logits memory O(block_size x candidates)
    num_chunks: int = 1  # gradient-caching chunks per global batch (1 = plain step)
    retrieval_weight: float = 1.0  # retrieval batches' loss x this (piccolo v2: 1)
    sts_temperature: float = 0.05  # sts batches (scored pairs): CoSENT with scale 1 / this (piccolo v2: 0.05)
    sts_weight: float = 0.04  # sts batches' loss x this (piccolo v2: 0.04)
    # classification batches: each text against its label and its own other labels (piccolo v2: 0.05)
    classification_temperature: float = 0.05
    classification_weight: float = 0.2  # classification batches' loss x this (piccolo v2: 0.2)
    # Retrieval batches with teacher scores (BGE pos_scores / neg_scores): + distill_weight x KL(teacher ||
    # student) over each query's own 1 + K candidates (FlagEmbedding: 1). 0 = no distillation.
    distill_weight: float = 0.0
    distill_temperature: float = 0.0  # student temperature of the KL term; 0 = loss.temperature
    teacher_temperature: float = 1.0  # the teacher distribution is softmax(scores / this)
    # Matryoshka: every task's loss at each of these prefix dimensions (truncated, renormalised), summed with
    # matryoshka_weights (piccolo v2: 256, 512, ..., 1792). Empty = the full embedding only.
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()  # one per dim (piccolo v2: 1/7 each); empty = 1 each

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"loss.kind={self.kind!r}; expected one of {LOSSES}")
        for name in ("temperature", "sts_temperature", "classification_temperature", "teacher_temperature"):
            if not getattr(self, name) >= 1e-30:  # 1 / temperature must stay a finite float32 (max 3.4e38)
                raise ValueError(f"loss.{name}={getattr(self, name)} must be >= 1e-30 (typical: 0.01 to 0.05)")
        if not (self.distill_temperature == 0 or self.distill_temperature >= 1e-30):
            raise ValueError(f"loss.distill_temperature={self.distill_temperature} must be 0 (= loss.temperature) "
                             "or >= 1e-30")
        if self.block_size <= 0 or self.num_chunks <= 0:
            raise ValueError(f"loss: temperature, block_size and num_chunks must be positive ({self})")
        for name in ("retrieval_weight", "sts_weight", "classification_weight", "distill_weight"):
            if not (0 <= getattr(self, name) < float("inf")):
                raise ValueError(f"loss.{name}={getattr(self, name)} must be a finite number >= 0")
        object.__setattr__(self, "matryoshka_dims", tuple(int(d) for d in self.matryoshka_dims))
        object.__setattr__(self, "matryoshka_weights", tuple(float(w) for w in self.matryoshka_weights))
        dims = self.matryoshka_dims
        if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"loss.matryoshka_dims={list(dims)} must be distinct positive ints")
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(dims):
            raise ValueError(f"loss.matryoshka_weights has {len(self.matryoshka_weights)} weights for "
                             f"{len(dims)} matryoshka_dims")
        if not all(0 <= w < float("inf") for w in self.matryoshka_weights):
            raise ValueError(f"loss.matryoshka_weights={list(self.matryoshka_weights)} must be finite and >= 0")

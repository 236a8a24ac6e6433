"""The loss of one global batch by its dataset's task type: piccolo v2's hybrid training.

Every global batch comes from one dataset (the sampler's guarantee), and each dataset has one task type
(`data.sources`), so a step's loss is picked at trace time from a static task name; a run compiles at
most one program per task type (and layout):

    retrieval       w_r L_c(q, p, n)  [+ w_d KL(teacher || student)]      L_c = loss.kind at loss.temperature
    sts             w_s CoSENT(q, p, labels; tau_s)
    classification  w_c OwnNegatives(q, p, n; tau_c)                     no in-batch negatives

piccolo v2 (hjq133/piccolo-embedding, `piccolo/model.py`, `piccolo/criteria.py`): retrieval InfoNCE over
every in-batch positive and hard negative at tau 0.01 (`hard_negative_loss`; `in_batch` without
negatives), weight 1; CoSENT at tau 0.05 with weight 0.04; classification contrast at tau 0.05 with weight
0.2. Distillation (FlagEmbedding): the KL divergence from the softmax of the teacher scores over each
query's own 1 + K candidates, on the rows whose record carries teacher scores (`has_teacher`), at the
student temperature `distill_temperature` (0: the retrieval temperature).

With `matryoshka_dims` the whole task loss is computed at each prefix dimension d_k (truncated and
renormalised embeddings) and summed with `matryoshka_weights` w_k (sentence-transformers'
MatryoshkaLoss; piccolo v2: dims 256 ... 1,792 with w_k = 1/7, the mean):

    L = sum_k w_k L_task(trunc_{d_k}(q), trunc_{d_k}(p), trunc_{d_k}(n))

Metrics: those of the task loss (as `weighted_sum` / `matryoshka_loss` name them), which the train step
reports both as they are and under "<task>/".
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from piccolo_jax.config.data import TASKS
from piccolo_jax.losses import contrastive, task_losses
from piccolo_jax.losses.matryoshka import matryoshka

LossFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, dict]]


def contrastive_loss_fn(cfg) -> LossFn:
    """(q [B,D], p [B,D], negs [B,K,D] | None) -> (loss, metrics) of `cfg.kind` (a `LossConfig`)."""
    def loss_fn(q, p, negs):
        if cfg.kind == "in_batch":
            return contrastive.in_batch_softmax_loss(q, p, cfg.temperature, block_size=cfg.block_size)
        if cfg.kind == "hard_negative":
            if negs is None:  # a retrieval dataset of pairs: InfoNCE over the in-batch positives (piccolo v2)
                return contrastive.in_batch_softmax_loss(q, p, cfg.temperature, block_size=cfg.block_size)
            return contrastive.hard_negative_loss(q, p, negs, cfg.temperature, block_size=cfg.block_size)
        return contrastive.gte_loss(q, p, negs, cfg.temperature, block_size=cfg.block_size)
    return loss_fn


def _weighted(weight: float, result):
    """w x (loss, metrics); the loss left as it is when w = 1 (bit-identical to the unweighted loss)."""
    loss, metrics = result
    return (loss if weight == 1.0 else weight * loss), metrics


def task_loss_fn(cfg, task: str, batch: dict) -> LossFn:
    """The loss of a batch of `task` (module doc) as a function of its embeddings; `batch` supplies the
    labels (sts) and teacher scores (retrieval) as global arrays, `cfg` is a `LossConfig`."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}; expected one of {TASKS}")
    if task == "retrieval":
        contrastive = contrastive_loss_fn(cfg)
        distill = cfg.distill_weight > 0 and "teacher_scores" in batch

        def fn(q, p, negs):
            if not distill or negs is None:
                return _weighted(cfg.retrieval_weight, contrastive(q, p, negs))
            student_tau = cfg.distill_temperature or cfg.temperature
            kl = task_losses.distill_kl_loss(q, p, negs, batch["teacher_scores"], student_tau,
                                             teacher_temperature=cfg.teacher_temperature,
                                             mask_b=batch["has_teacher"] > 0)
            return task_losses.weighted_sum({"contrastive": (cfg.retrieval_weight, contrastive(q, p, negs)),
                                             "distill": (cfg.distill_weight, kl)})
    elif task == "sts":
        if "labels" not in batch:
            raise ValueError("an sts batch needs its labels (batch['labels'] [B] float32)")

        def fn(q, p, negs):
            return _weighted(cfg.sts_weight, task_losses.cosent_loss(q, p, batch["labels"], cfg.sts_temperature))
    else:
        def fn(q, p, negs):
            if negs is None:
                raise ValueError("a classification batch needs each record's own negatives")
            return _weighted(cfg.classification_weight,
                             task_losses.own_negatives_loss(q, p, negs, cfg.classification_temperature))
    if cfg.matryoshka_dims:
        fn = matryoshka(fn, cfg.matryoshka_dims, cfg.matryoshka_weights or None)
    return fn


def describe(cfg, tasks) -> str:
    """One log line: the loss, temperature and weight of each task type present."""
    parts = []
    for task in tasks:
        if task == "retrieval":
            part = f"retrieval {cfg.kind} (temperature {cfg.temperature}, weight {cfg.retrieval_weight})"
            if cfg.distill_weight:
                part += (f" + {cfg.distill_weight} x distillation (student temperature "
                         f"{cfg.distill_temperature or cfg.temperature}, teacher {cfg.teacher_temperature})")
        elif task == "sts":
            part = f"sts cosent (temperature {cfg.sts_temperature}, weight {cfg.sts_weight})"
        else:
            part = (f"classification own negatives (temperature {cfg.classification_temperature}, weight "
                    f"{cfg.classification_weight})")
        parts.append(part)
    line = "losses by task: " + "; ".join(parts)
    if cfg.matryoshka_dims:
        weights = cfg.matryoshka_weights or (1.0,) * len(cfg.matryoshka_dims)
        line += f"; Matryoshka at dims {list(cfg.matryoshka_dims)} with weights {[round(w, 4) for w in weights]}"
    return line

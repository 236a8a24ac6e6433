"""Optimiser: AdamW with warmup then linear / cosine decay, global-norm clipping, no decay on LN and biases."""

from __future__ import annotations

from typing import Any

import jax
import optax

from piccolo_jax.config.optim import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """0 -> lr over `warmup_steps`, then decay to 0 at `total_steps` (or stay constant)."""
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def weight_decay_mask(params: Any) -> Any:
    """True for matrices (kernels, embedding tables); False for biases and LayerNorm scales."""
    def decays(path, _):
        return getattr(path[-1], "key", None) in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, masked decay)."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=weight_decay_mask))
    return optax.chain(*parts)

"""Optimiser: AdamW with warmup then linear / cosine decay, global-norm clipping, no decay on LN and biases.

The learning rate's numbers (peak, warmup steps, total steps) are data, not constants of the compiled step:
the train step takes them as a [3] float32 argument (`LearningRate.values`) and hands them to the optimiser's
last transformation, so runs that differ only in `optim.lr`, `optim.warmup_steps` or `run.steps` (an
extended run, a test of another length) share one compiled program and its persistent-cache entry. The
optimiser state is optax.adamw's with a schedule, so checkpoints keep their layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from piccolo_jax.config.optim import OptimConfig


class LearningRate:
    """0 -> lr over `warmup_steps` (linear), then to 0 at `total_steps` (linear or cosine), or constant.

    `values` = [lr, warmup_steps, total_steps] float32 (step counts exact below 2^24); `lr(count, values)`
    evaluates the schedule for traced values, `lr(count)` for this run's. The formulas are optax's
    (join_schedules of linear_schedule(0, lr, max(warmup, 1)) and linear_schedule(lr, 0, ...) /
    cosine_decay_schedule(lr, ...) over max(total - warmup, 1) steps), written for traced numbers.
    """

    def __init__(self, cfg: OptimConfig, total_steps: int):
        self.kind = cfg.schedule
        self.values = np.asarray([cfg.lr, cfg.warmup_steps, total_steps], np.float32)

    def __call__(self, count, values=None) -> jax.Array:
        lr, warmup, total = (jnp.asarray(self.values) if values is None else values)
        count = jnp.asarray(count).astype(jnp.float32)
        ramp = jnp.maximum(warmup, 1.0)
        warm = (0.0 - lr) * (1.0 - jnp.clip(count, 0.0, ramp) / ramp) + lr  # optax's (init - end) frac + end
        decay_steps = jnp.maximum(total - warmup, 1.0)
        after = count - warmup
        if self.kind == "linear":
            decayed = lr * (1.0 - jnp.clip(after, 0.0, decay_steps) / decay_steps)
        elif self.kind == "cosine":
            decayed = lr * (0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(after, decay_steps) / decay_steps)))
        else:
            decayed = lr * jnp.ones_like(count)
        return jnp.where(count < warmup, warm, decayed)


def _scale_by_learning_rate(lr: LearningRate) -> optax.GradientTransformationExtraArgs:
    """updates * -lr(count); `update(..., lr_values=v)` takes the schedule's numbers from v (traced).
    Its state is optax.ScaleByScheduleState, as optax.adamw's with a schedule."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, lr_values=None, **extra):
        del params, extra
        step_size = -lr(state.count, lr_values)
        updates = jax.tree.map(lambda g: jnp.asarray(step_size, g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


def weight_decay_mask(params: Any) -> Any:
    """True for matrices (kernels, embedding tables); False for biases and LayerNorm scales."""
    def decays(path, _):
        return getattr(path[-1], "key", None) in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """clip_by_global_norm -> AdamW(masked decay, LearningRate(cfg, total_steps)); `update` accepts
    `lr_values` (LearningRate.values, possibly traced) to override the schedule's numbers."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.chain(
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, weight_decay_mask),
        _scale_by_learning_rate(LearningRate(cfg, total_steps))))
    return optax.chain(*parts)

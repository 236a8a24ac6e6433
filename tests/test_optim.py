"""The learning-rate schedule as data: equal to optax's schedules, the optimiser equal to optax.adamw with
them, and one compiled program for any lr / warmup / length (checked through the CLI in test_compiles)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from piccolo_jax.config.optim import OptimConfig
from piccolo_jax.training.optim import LearningRate, make_optimizer, weight_decay_mask

CASES = [(kind, w, t) for kind in ("linear", "cosine", "constant") for w, t in ((0, 10), (4, 60), (10, 10), (7, 3))]


def _optax_schedule(cfg: OptimConfig, total: int) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    d = max(total - cfg.warmup_steps, 1)
    decay = {"linear": optax.linear_schedule(cfg.lr, 0.0, d), "cosine": optax.cosine_decay_schedule(cfg.lr, d),
             "constant": optax.constant_schedule(cfg.lr)}[cfg.schedule]
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


@pytest.mark.parametrize("kind,warmup,total", CASES)
def test_schedule_equals_optax_and_takes_its_numbers_as_data(kind, warmup, total):
    cfg = OptimConfig(lr=5e-4, warmup_steps=warmup, schedule=kind)
    counts = jnp.arange(total + 5, dtype=jnp.int32)
    ref = np.asarray(jax.vmap(_optax_schedule(cfg, total))(counts))
    ours = np.asarray(jax.vmap(LearningRate(cfg, total))(counts))
    # A few float32 ulps of the decay fraction (1 - c / d, near 1) apart, times lr: XLA rounds a division by
    # a constant differently from one by a value; the formulas are optax's.
    tol = dict(rtol=1e-6, atol=cfg.lr * 2.0 ** -21)
    np.testing.assert_allclose(ours, ref, **tol)
    # The same numbers passed as traced data to a schedule built for others (another lr and length).
    other = LearningRate(OptimConfig(lr=1.0, warmup_steps=1, schedule=kind), 1000)
    traced = jax.jit(jax.vmap(other, in_axes=(0, None)))(counts, jnp.asarray(LearningRate(cfg, total).values))
    np.testing.assert_allclose(np.asarray(traced), ref, **tol)


def test_optimizer_equals_optax_adamw_and_keeps_its_state_layout():
    cfg = OptimConfig(lr=3e-3, warmup_steps=2, schedule="cosine", weight_decay=0.1, clip_norm=0.5)
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}}
    ref_tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                         optax.adamw(_optax_schedule(cfg, 6), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay, mask=weight_decay_mask))
    ours_tx = make_optimizer(OptimConfig(lr=1.0, warmup_steps=0, schedule="cosine", weight_decay=0.1,
                                         clip_norm=0.5), 99)  # other numbers: the step passes them
    values = jnp.asarray(LearningRate(cfg, 6).values)
    ref_p, ours_p = params, params
    ref_s, ours_s = ref_tx.init(params), ours_tx.init(params)
    assert jax.tree.structure(ours_s) == jax.tree.structure(ref_s)  # checkpoints keep their layout
    update = jax.jit(lambda g, s, p, v: ours_tx.update(g, s, p, lr_values=v))
    for _ in range(6):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u, ref_s = ref_tx.update(grads, ref_s, ref_p)
        ref_p = optax.apply_updates(ref_p, u)
        u, ours_s = update(grads, ours_s, ours_p, values)
        ours_p = optax.apply_updates(ours_p, u)
        for a, b in zip(jax.tree.leaves(ours_p), jax.tree.leaves(ref_p)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # Without lr_values the optimiser applies its own schedule (library users who build their own step).
    own = make_optimizer(cfg, 6)
    u, _ = own.update(grads, own.init(params), params)
    u_ref, _ = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(_optax_schedule(cfg, 6), weight_decay=0.1,
                                                                     mask=weight_decay_mask)).update(
        grads, ref_tx.init(params), params)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-12)

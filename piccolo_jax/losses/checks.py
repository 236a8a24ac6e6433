"""Argument checks shared by the losses: each names the argument and the shape or value it needs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def check_temperature(temperature) -> float:
    try:
        value = float(temperature)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise ValueError(
            "temperature must be a concrete number > 0 (pass it as a Python float, not as a traced "
            f"jit argument), got {temperature!r}"
        ) from err
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {value}")
    return value


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return int(block_size)


def check_floating(name: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must be a floating array, got dtype {jnp.result_type(x)}")


def check_pair(q_bd, p_bd) -> tuple[int, int]:
    if jnp.ndim(q_bd) != 2 or jnp.shape(q_bd)[0] < 1 or jnp.shape(q_bd)[1] < 1:
        raise ValueError(f"q_bd must have shape [B, D] with B, D >= 1, got shape {jnp.shape(q_bd)}")
    if jnp.shape(p_bd) != jnp.shape(q_bd):
        raise ValueError(
            f"p_bd must have the shape of q_bd {jnp.shape(q_bd)}, got shape {jnp.shape(p_bd)}"
        )
    check_floating("q_bd", q_bd)
    check_floating("p_bd", p_bd)
    return jnp.shape(q_bd)


def check_negs(negs_bkd, batch: int, dim: int) -> int:
    shape = jnp.shape(negs_bkd)
    if len(shape) != 3:
        raise ValueError(f"negs_bkd must have shape [B, K, D] (3-D), got shape {shape}")
    if shape[0] != batch or shape[2] != dim:
        raise ValueError(
            f"negs_bkd must have shape [B={batch}, K, D={dim}], got shape {shape}"
        )
    if shape[1] < 1:
        raise ValueError(f"negs_bkd must hold K >= 1 negatives per query, got shape {shape}")
    check_floating("negs_bkd", negs_bkd)
    return shape[1]

"""Matryoshka representation learning: any loss at several prefix dimensions of the embeddings.

For dimensions d_1, ..., d_m and weights w_1, ..., w_m (Kusupati et al. 2022):

    L = sum_k w_k L(trunc_{d_k}(e_1), trunc_{d_k}(e_2), ...),   trunc_d(x) = x[..., :d] / ||x[..., :d]||

every embedding argument e of the loss being cut to its first d coordinates and L2-normalised
again, so that the first d coordinates alone are a usable embedding. This is sentence-transformers'
``MatryoshkaLoss(model, loss, matryoshka_dims, matryoshka_weights)`` (weights default to 1 each,
a sum, not a mean); piccolo v2 uses dims 256, 512, ..., 1792 with weights 1/7 each (the mean).

Truncating a normalised embedding and renormalising equals truncating the raw one and normalising,
so the wrapper accepts either. The gradient of every dimension's loss flows into the same full
embedding; the encoder runs once. Memory: one truncated copy per dimension at a time inside the
loss (B (1 + K) d floats), nothing the size of the logits beyond what the wrapped loss needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from piccolo_jax.losses.contrastive import Metrics

NORM_EPS = 1e-12  # as torch.nn.functional.normalize: x / max(||x||, eps)

LossFn = Callable[..., tuple[jax.Array, Metrics]]


def truncate(x: jax.Array, dim: int) -> jax.Array:
    """x[..., :dim] / max(||x[..., :dim]||, 1e-12), the norm taken in float32; result in x's dtype."""
    head = x[..., :dim].astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(head * head, axis=-1, keepdims=True))
    return (head / jnp.maximum(norm, NORM_EPS)).astype(x.dtype)


def _check_dims(dims, weights, full_dim: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    dims = tuple(dims)
    if not dims:
        raise ValueError("matryoshka dims must not be empty")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= d <= full_dim:
            raise ValueError(f"matryoshka dims must be ints in [1, {full_dim}] (the embedding size), got {dims}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"matryoshka dims must be distinct, got {dims}")
    if weights is None:
        weights = (1.0,) * len(dims)
    weights = tuple(weights)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka weights {weights} must be as many as the dims {dims}")
    try:
        weights = tuple(float(w) for w in weights)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as err:
        raise ValueError(f"matryoshka weights must be concrete numbers, got {weights}") from err
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"matryoshka weights must be finite and >= 0, got {weights}")
    return tuple(int(d) for d in dims), weights


def matryoshka_loss(
    loss_fn: LossFn,
    embeddings: Sequence[Optional[jax.Array]],
    dims: Sequence[int],
    weights: Optional[Sequence[float]] = None,
) -> tuple[jax.Array, Metrics]:
    """sum_k w_k loss_fn(*[trunc_{d_k}(e) for e in embeddings]) (see the module docstring).

    Args:
      loss_fn: a loss of embeddings only, returning (loss, metrics); bind everything else first,
        e.g. ``lambda q, p, n: hard_negative_loss(q, p, n, 0.01)`` or
        ``lambda a, b: cosent_loss(a, b, labels, 0.05)``.
      embeddings: the loss's embedding arguments, each [..., D] with the same D (None passes through
        untouched, e.g. absent hard negatives).
      dims: prefix dimensions, distinct, each in [1, D]; D itself is usually one of them.
      weights: one per dimension, >= 0; default 1 each (sentence-transformers' default).

    Returns:
      (loss, metrics): the weighted sum; metrics ``"dim_<d>/loss"`` and ``"dim_<d>/<metric>"`` for
      each dimension, plus the metrics of the largest dimension without prefix (so ``accuracy`` is
      the full-size accuracy when D is among the dims).
    """
    present = [e for e in embeddings if e is not None]
    if not present:
        raise ValueError("matryoshka_loss needs at least one embedding")
    sizes = {jnp.shape(e)[-1] for e in present}
    if len(sizes) != 1:
        raise ValueError(f"embeddings must share their last dimension, got sizes {sorted(sizes)}")
    dims, weights = _check_dims(dims, weights, sizes.pop())

    total, metrics = jnp.zeros((), jnp.float32), {}
    for d, w in sorted(zip(dims, weights), reverse=True):  # largest first, as sentence-transformers
        loss, dim_metrics = loss_fn(*[None if e is None else truncate(e, d) for e in embeddings])
        if w != 0.0:
            total = total + w * loss.astype(jnp.float32)
        if not metrics:
            metrics.update(dim_metrics)
        metrics[f"dim_{d}/loss"] = jax.lax.stop_gradient(loss.astype(jnp.float32))
        metrics.update({f"dim_{d}/{key}": value for key, value in dim_metrics.items()})
    return total, metrics


def matryoshka(loss_fn: LossFn, dims: Sequence[int], weights: Optional[Sequence[float]] = None) -> LossFn:
    """``loss_fn`` wrapped by :func:`matryoshka_loss`: ``matryoshka(fn, dims)(q, p, n)``."""

    def wrapped(*embeddings):
        return matryoshka_loss(loss_fn, embeddings, dims, weights)

    return wrapped

"""Train state and the pure, jitted, state-donating contrastive train step over a device mesh."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from piccolo_jax import grad_cache, losses, sharding
from piccolo_jax.model import abstract_model, encode, encode_packed, init_params
from piccolo_jax.model_config import ModelConfig

LOSSES = ("in_batch", "hard_negative", "gte")
# Optional batch entry [B] int32: a process's rows carry 1 when it received SIGINT / SIGTERM. The step
# returns their max as a metric, so that all processes of a multi-host run agree on when to stop.
STOP_KEY = "stop_requested"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which contrastive loss, its temperature, and how the global batch is processed."""

    kind: str = "in_batch"  # "in_batch" (pretrain), "hard_negative" or "gte" (finetune)
    temperature: float = 0.01  # logits = cosine / temperature (piccolo v2 / M3E: 0.01)
    block_size: int = 512  # loss rows per block: logits memory O(block_size x candidates)
    num_chunks: int = 1  # gradient-caching chunks per global batch (1 = plain step)

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"loss.kind={self.kind!r}; expected one of {LOSSES}")
        if not self.temperature >= 1e-30:  # 1 / temperature must stay a finite float32 (max 3.4e38)
            raise ValueError(f"loss.temperature={self.temperature} must be >= 1e-30 (typical: 0.01 to 0.05)")
        if self.block_size <= 0 or self.num_chunks <= 0:
            raise ValueError(f"loss: temperature, block_size and num_chunks must be positive ({self})")


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates applied
    params: Any  # float32 master weights
    opt_state: Any  # optax state (moments sharded per strategy)
    skipped: jax.Array  # int32 scalar: steps whose loss or gradient was not finite (update skipped)


def make_loss_fn(cfg: LossConfig):
    """(q [B,D], p [B,D], negs [B,K,D] | None) -> (loss, metrics) for the configured loss."""
    def loss_fn(q, p, negs):
        if cfg.kind == "in_batch":
            return losses.in_batch_softmax_loss(q, p, cfg.temperature, block_size=cfg.block_size)
        if cfg.kind == "hard_negative":
            if negs is None:
                raise ValueError("loss.kind='hard_negative' needs hard negatives in the batch")
            return losses.hard_negative_loss(q, p, negs, cfg.temperature, block_size=cfg.block_size)
        return losses.gte_loss(q, p, negs, cfg.temperature, block_size=cfg.block_size)
    return loss_fn


def state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    strategy: str) -> TrainState:
    _, abstract, logical = abstract_model(model_cfg)
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=sharding.param_shardings(abstract, logical, mesh, strategy),
                      opt_state=sharding.opt_state_shardings(optimizer, abstract, logical, mesh, strategy),
                      skipped=rep)


def create_train_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                       strategy: str, key: jax.Array, params: Any | None = None) -> TrainState:
    """Build the state already sharded: random init (or given params) under jit with out_shardings."""
    shardings = state_shardings(model_cfg, optimizer, mesh, strategy)

    def build(k, p):
        p = init_params(model_cfg, k) if p is None else jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)
        return TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p), jnp.zeros((), jnp.int32))

    if params is not None:  # host arrays go straight to their shards
        params = jax.device_put(params, shardings.params)
    return jax.jit(build, out_shardings=shardings)(key, params)


def make_train_step(model_cfg: ModelConfig, loss_cfg: LossConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, strategy: str, lr_schedule: optax.Schedule | None = None):
    """jit(train_step(state, batch, key) -> (state, metrics)), donating `state`.

    `batch` holds global arrays: query_input_ids / query_attention_mask [B, Tq], passage_* [B, Tp] and, for
    hard negatives, negative_* [B, K, Tp]; or the packed layout of `packing.pack_host_batch` (the same loss,
    gradient and update; one compiled program per layout and shape). `key` is this step's dropout key
    (e.g. fold_in(seed_key, step)).
    """
    shards = sharding.data_parallel_size(mesh)
    loss_fn = make_loss_fn(loss_cfg)

    gather = None
    if strategy == "fsdp":
        # Gather-on-use: inside the encoder each weight is all-gathered over the fsdp axis (kept split over
        # "tensor"), instead of XLA all-reducing activations of the whole batch against sharded weights.
        _, abstract, logical = abstract_model(model_cfg)
        gather = sharding.param_shardings(abstract, logical, mesh, "dp")

    def gathered(params):
        return params if gather is None else jax.lax.with_sharding_constraint(params, gather)

    def encode_fn(params, ids, mask, keys):
        return encode(model_cfg, gathered(params), ids, mask, dropout_key=keys)["embeddings"]

    def encode_packed_fn(params, ids, positions, segments, num_slots, keys):
        return encode_packed(model_cfg, gathered(params), ids, positions, segments, num_slots, keys)

    def step(state: TrainState, batch: dict, key: jax.Array):
        packed = "packed_query_input_ids" in batch  # packing.pack_host_batch's layout
        loss, metrics, grads = (grad_cache.packed_loss_and_grads if packed else grad_cache.loss_and_grads)(
            encode_packed_fn if packed else encode_fn, loss_fn, state.params, batch, key,
            num_chunks=loss_cfg.num_chunks, shards=shards, constrain=sharding.row_constraint(mesh),
            local_sum=sharding.shard_local_sum(mesh, strategy))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Non-finite guard over the loss, the gradient and the result: the global L2 norms of the updated
        # parameters and optimizer moments must be finite too. A norm overflows float32 (3.4e38) long
        # before training is sane again, so an update that blows the weights up to ~1e30 is refused with
        # the step that made it, not one step later. Refused: keep the old state, count the skipped step.
        moments = [x for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
                  & jnp.isfinite(optax.tree.norm(moments)))
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        new_state = TrainState(
            step=state.step + finite.astype(jnp.int32),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=new_state.skipped)
        if STOP_KEY in batch:  # any process asked to stop: every process reads the same value
            metrics[STOP_KEY] = jnp.max(batch[STOP_KEY])
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        return new_state, metrics

    shardings = state_shardings(model_cfg, optimizer, mesh, strategy)
    return jax.jit(step, out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))

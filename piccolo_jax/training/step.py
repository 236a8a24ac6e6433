"""Train state and the pure, jitted, state-donating contrastive train step over a device mesh.

The step's loss follows the task type of its batch (`task`, a static argument: piccolo_jax.losses.hybrid),
so a hybrid run compiles one program per task type (and layout) it meets."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from piccolo_jax.config.loss import LossConfig
from piccolo_jax.config.model import ModelConfig
from piccolo_jax.losses import hybrid
from piccolo_jax.model.bert import abstract_model, encode, encode_packed
from piccolo_jax.parallel import sharding
from piccolo_jax.training import grad_cache
from piccolo_jax.training.optim import LearningRate
from piccolo_jax.training.state import TrainState, state_shardings

# Optional batch entry [B] int32: a process's rows carry 1 when it received SIGINT / SIGTERM. The step
# returns their max as a metric, so that all processes of a multi-host run agree on when to stop.
STOP_KEY = "stop_requested"


def make_train_step(model_cfg: ModelConfig, loss_cfg: LossConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, strategy: str, lr_schedule: LearningRate | None = None):
    """jit(train_step(state, batch, key, task="retrieval", lr_values=None) -> (state, metrics)), donating `state`.

    `batch` holds global arrays: query_input_ids / query_attention_mask [B, Tq], passage_* [B, Tp] and, for
    hard negatives, negative_* [B, K, Tp]; or the packed layout of `packing.pack_host_batch` (the same loss,
    gradient and update; one compiled program per layout and shape); plus what the task's loss needs
    (`data.batching.TASK_KEYS`: labels [B] for sts, teacher_scores [B, 1 + K] and has_teacher [B] for
    distillation). `key` is this step's dropout key (e.g. fold_in(seed_key, step)). `task` (static: one
    program per task type) picks the loss (piccolo_jax.losses.hybrid); the metrics carry the task loss's own
    metrics as they are and under "<task>/", and "loss/<task>" = loss. `lr_values` (optional, [3] float32,
    `optim.LearningRate.values`) passes the learning-rate schedule's numbers as data: the trainer does, so
    that its compiled step does not depend on them (piccolo_jax.training.optim).
    """
    shards = sharding.data_parallel_size(mesh)

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

    def step(state: TrainState, batch: dict, key: jax.Array, task: str = "retrieval", lr_values=None):
        loss_fn = hybrid.task_loss_fn(loss_cfg, task, batch)
        packed = "packed_query_input_ids" in batch  # packing.pack_host_batch's layout
        loss, metrics, grads = (grad_cache.packed_loss_and_grads if packed else grad_cache.loss_and_grads)(
            encode_packed_fn if packed else encode_fn, loss_fn, state.params, batch, key,
            num_chunks=loss_cfg.num_chunks, shards=shards, constrain=sharding.row_constraint(mesh),
            local_sum=sharding.shard_local_sum(mesh, strategy))
        grad_norm = optax.tree.norm(grads)
        extra = {} if lr_values is None else {"lr_values": lr_values}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
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
        metrics = dict(metrics, **{f"{task}/{k}": v for k, v in metrics.items()}, loss=loss, grad_norm=grad_norm,
                       skipped=new_state.skipped, **{f"loss/{task}": loss})
        if STOP_KEY in batch:  # any process asked to stop: every process reads the same value
            metrics[STOP_KEY] = jnp.max(batch[STOP_KEY])
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step, lr_values)
        return new_state, metrics

    shardings = state_shardings(model_cfg, optimizer, mesh, strategy)
    return jax.jit(step, out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,),
                   static_argnames=("task",))

"""Train state and the pure, jitted, state-donating contrastive train step over a device mesh.

The step's loss follows the task type of its batch (`task`, a static argument: piccolo_jax.hybrid_loss),
so a hybrid run compiles one program per task type (and layout) it meets."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from piccolo_jax import grad_cache, hybrid_loss, sharding
from piccolo_jax.model import abstract_model, encode, encode_packed, init_params
from piccolo_jax.model_config import ModelConfig

LOSSES = ("in_batch", "hard_negative", "gte")
# Optional batch entry [B] int32: a process's rows carry 1 when it received SIGINT / SIGTERM. The step
# returns their max as a metric, so that all processes of a multi-host run agree on when to stop.
STOP_KEY = "stop_requested"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The loss of each task type (piccolo_jax.hybrid_loss), and how the global batch is processed."""

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


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates applied
    params: Any  # float32 master weights
    opt_state: Any  # optax state (moments sharded per strategy)
    skipped: jax.Array  # int32 scalar: steps whose loss or gradient was not finite (update skipped)


def make_loss_fn(cfg: LossConfig):
    """(q [B,D], p [B,D], negs [B,K,D] | None) -> (loss, metrics) of the retrieval loss `cfg.kind`."""
    return hybrid_loss.contrastive_loss_fn(cfg)


def state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    strategy: str) -> TrainState:
    _, abstract, logical = abstract_model(model_cfg)
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=sharding.param_shardings(abstract, logical, mesh, strategy),
                      opt_state=sharding.opt_state_shardings(optimizer, abstract, logical, mesh, strategy),
                      skipped=rep)


def create_train_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                       strategy: str, key: jax.Array, params: Any | None = None) -> TrainState:
    """Build the state already sharded: random init (or given params) under jit with out_shardings.

    Given params may lack the Dense head (`FRESH_SUBTREES`): an encoder without one starts a model that has
    one, whose head is then the random init's (piccolo v2 adds its scaling layer so to a pretrained encoder).
    """
    shardings = state_shardings(model_cfg, optimizer, mesh, strategy)
    fresh = missing_subtrees(model_cfg, params)

    def build(k, p):
        if p is None:
            p = init_params(model_cfg, k)
        else:
            p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)
            if fresh:  # XLA keeps only the initialisation of the missing subtrees
                init = init_params(model_cfg, k)
                p = {**p, **{name: init[name] for name in fresh}}
        return TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p), jnp.zeros((), jnp.int32))

    if params is not None:  # host arrays go straight to their shards
        params = jax.device_put(params, {name: shardings.params[name] for name in params})
    return jax.jit(build, out_shardings=shardings)(key, params)


FRESH_SUBTREES = ("dense",)  # what given params may lack: initialised at random by create_train_state


def missing_subtrees(model_cfg: ModelConfig, params: Any | None) -> tuple[str, ...]:
    """The top-level subtrees of the model that `params` lacks (only FRESH_SUBTREES may be missing)."""
    if params is None:
        return ()
    _, abstract, _ = abstract_model(model_cfg)
    missing = tuple(name for name in abstract if name not in params)
    extra = sorted(set(params) - set(abstract))
    if extra or any(name not in FRESH_SUBTREES for name in missing):
        raise ValueError(f"the parameters do not fit the model: unexpected {extra}, missing {list(missing)}")
    return missing


def make_train_step(model_cfg: ModelConfig, loss_cfg: LossConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, strategy: str, lr_schedule: optax.Schedule | None = None):
    """jit(train_step(state, batch, key, task="retrieval") -> (state, metrics)), donating `state`.

    `batch` holds global arrays: query_input_ids / query_attention_mask [B, Tq], passage_* [B, Tp] and, for
    hard negatives, negative_* [B, K, Tp]; or the packed layout of `packing.pack_host_batch` (the same loss,
    gradient and update; one compiled program per layout and shape); plus what the task's loss needs
    (`data.batching.TASK_KEYS`: labels [B] for sts, teacher_scores [B, 1 + K] and has_teacher [B] for
    distillation). `key` is this step's dropout key (e.g. fold_in(seed_key, step)). `task` (static: one
    program per task type) picks the loss (piccolo_jax.hybrid_loss); the metrics carry the task loss's own
    metrics as they are and under "<task>/", and "loss/<task>" = loss.
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

    def step(state: TrainState, batch: dict, key: jax.Array, task: str = "retrieval"):
        loss_fn = hybrid_loss.task_loss_fn(loss_cfg, task, batch)
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
        metrics = dict(metrics, **{f"{task}/{k}": v for k, v in metrics.items()}, loss=loss, grad_norm=grad_norm,
                       skipped=new_state.skipped, **{f"loss/{task}": loss})
        if STOP_KEY in batch:  # any process asked to stop: every process reads the same value
            metrics[STOP_KEY] = jnp.max(batch[STOP_KEY])
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        return new_state, metrics

    shardings = state_shardings(model_cfg, optimizer, mesh, strategy)
    return jax.jit(step, out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,),
                   static_argnames=("task",))

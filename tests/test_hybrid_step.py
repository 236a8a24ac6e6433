"""The hybrid train step (one loss per task type) against an independent single-device reference.

The reference is written here from public pieces only: `model.encode` (Dense head included) with per-row
dropout keys fold_in(key, global row) (queries 0..B-1, positives B..2B-1, negative (i, j) at 2B + iK + j),
the task losses of `task_losses` / `losses` (each proven equal to sentence-transformers / piccolo v2 /
FlagEmbedding in their own tests) combined with the weights by hand, Matryoshka written out here (cut to
d coordinates, renormalise, weighted sum), and `jax.value_and_grad` on one device. It shares no code with
`hybrid_loss`, `matryoshka`, `grad_cache`, `train_step` or `sharding`.

Each configuration runs the jitted step on 8 simulated devices with gradient caching (chunks), for each
task type, every sharding strategy, both layouts (padded, packed) and the Dense head; it checks the loss,
"loss/<task>", the gradient norm and the gradient itself (Adam's first moment after one step without
clipping: mu = (1 - b1) g). Dropout is on (rate 0.1 on every site).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import pack_padded

from piccolo_jax.config.model import ModelConfig
from piccolo_jax.data import packing
from piccolo_jax.data.batching import task_arrays
from piccolo_jax.losses import contrastive as losses
from piccolo_jax.losses import task_losses
from piccolo_jax.model.bert import encode, init_params
from piccolo_jax.parallel.sharding import MeshConfig, host_local_to_global, make_mesh
from piccolo_jax.training.optim import OptimConfig, make_optimizer
from piccolo_jax.training.state import create_train_state
from piccolo_jax.training.step import LossConfig, make_train_step

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

# Tiny encoder with a Dense head 32 -> 48 (every dimension divides by 8: every sharding rule applies).
CFG = ModelConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=16, dense_out_features=48)
OPT = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=0.0)  # mu = (1 - b1) g
B, TQ, TP, K = 32, 8, 12, 2  # 32 = 8 shards x 2 chunks x 2 rows (x 4 chunks x 1 row)
STEP_KEY = jax.random.key(11)
FAST = {"xla_backend_optimization_level": 0}  # as test_train_step: the same HLO program, quicker code generation
RTOL, GRAD_ATOL_TENSOR, GRAD_ATOL_GLOBAL = 1e-5, 3e-6, 1e-9

LOSS = LossConfig(kind="hard_negative", temperature=0.05, block_size=8, sts_temperature=0.05, sts_weight=0.04,
                  classification_temperature=0.07, classification_weight=0.2, distill_weight=0.5,
                  distill_temperature=0.1, teacher_temperature=2.0)
MATRYOSHKA = {"matryoshka_dims": (16, 32, 48), "matryoshka_weights": (0.5, 0.25, 1.0)}


# ---------------------------------------------------------------------------------------------- data
def make_batch(task: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with right padding (>= 2 real tokens a row) and the task's arrays."""
    rng = np.random.default_rng(seed)

    def rows(shape, t):
        ids = rng.integers(1, CFG.vocab_size, size=(*shape, t), dtype=np.int32)
        lengths = rng.integers(2, t + 1, size=shape)
        mask = (np.arange(t) < lengths[..., None]).astype(np.int32)
        return ids * mask, mask

    out = {}
    out["query_input_ids"], out["query_attention_mask"] = rows((B,), TQ)
    out["passage_input_ids"], out["passage_attention_mask"] = rows((B,), TP)
    if task != "sts":
        out["negative_input_ids"], out["negative_attention_mask"] = rows((B, K), TP)
    if task == "sts":  # STS grades with ties (ties add nothing to CoSENT)
        out["labels"] = rng.integers(0, 6, size=B).astype(np.float32)
    if task == "retrieval":  # teacher scores on 3 of every 4 rows
        out["teacher_scores"] = rng.normal(0, 3, size=(B, 1 + K)).astype(np.float32)
        out["has_teacher"] = (np.arange(B) % 4 != 3).astype(np.int32)
    return out


@functools.cache
def host_params() -> dict:
    return jax.tree.map(np.asarray, jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0)))


# ---------------------------------------------------------------------------------------------- reference
def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def reference_task_loss(task: str, batch: dict, cfg: LossConfig, q, p, n):
    """The task's weighted loss on normalised embeddings, from the loss functions themselves."""
    if task == "sts":
        return cfg.sts_weight * task_losses.cosent_loss(q, p, batch["labels"], cfg.sts_temperature)[0]
    if task == "classification":
        return cfg.classification_weight * task_losses.own_negatives_loss(q, p, n, cfg.classification_temperature)[0]
    contrastive = losses.hard_negative_loss(q, p, n, cfg.temperature)[0]
    kl = task_losses.distill_kl_loss(q, p, n, batch["teacher_scores"], cfg.distill_temperature,
                                     teacher_temperature=cfg.teacher_temperature, mask_b=batch["has_teacher"] > 0)[0]
    return cfg.retrieval_weight * contrastive + cfg.distill_weight * kl


@functools.cache
def reference(task: str, matryoshka: bool) -> tuple[float, dict]:
    """(loss, gradient) of the global batch on one device, unchunked and unsharded, in float32 (returned as
    float64): the encoder and the task losses are each proven against outside references in their own tests
    (transformers.BertModel; sentence-transformers / numpy), so this checks what the step adds: chunking,
    sharding, the task switch and the weights."""
    cfg = LossConfig(**{**LOSS.__dict__, **(MATRYOSHKA if matryoshka else {})})
    batch = make_batch(task)
    dev = jax.devices()[0]

    def loss_fn(params, batch, key):
        def embed(ids, mask, rows):
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)
            return encode(CFG, params, ids, mask, dropout_key=keys)["embeddings"]

        q = embed(batch["query_input_ids"], batch["query_attention_mask"], jnp.arange(B))
        if task == "sts":
            p, n = embed(batch["passage_input_ids"], batch["passage_attention_mask"], B + jnp.arange(B)), None
        else:
            d = embed(jnp.concatenate([batch["passage_input_ids"], batch["negative_input_ids"].reshape(B * K, TP)]),
                      jnp.concatenate([batch["passage_attention_mask"],
                                       batch["negative_attention_mask"].reshape(B * K, TP)]),
                      B + jnp.arange(B + B * K))
            p, n = d[:B], d[B:].reshape(B, K, -1)
        if not matryoshka:
            return reference_task_loss(task, batch, cfg, q, p, n)
        total = 0.0
        for dim, w in zip(cfg.matryoshka_dims, cfg.matryoshka_weights):
            cut = [None if x is None else unit(x[..., :dim]) for x in (q, p, n)]
            total = total + w * reference_task_loss(task, batch, cfg, *cut)
        return total

    args = jax.device_put((host_params(), batch, STEP_KEY), dev)
    fn = jax.jit(jax.value_and_grad(loss_fn))
    loss, grads = fn.lower(*args).compile(FAST)(*args)
    return float(loss), jax.tree.map(lambda g: np.asarray(g, np.float64), grads)


# ---------------------------------------------------------------------------------------------- the step
def adam_mu(opt_state):
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1
    return found[0].mu


# task, (data, fsdp, tensor), strategy, chunks, layout, Matryoshka: every task type, every strategy, both
# layouts, chunks 2 and 4, Matryoshka on two.
CONFIGS = [
    ("sts", (8, 1, 1), "zero1", 2, "padded", False),
    ("classification", (2, 4, 1), "fsdp", 4, "padded", True),
    ("retrieval", (4, 1, 2), "dp", 2, "packed", False),
    ("sts", (4, 2, 1), "fsdp", 2, "packed", True),
]


@pytest.mark.parametrize("task,mesh_shape,strategy,num_chunks,layout,matryoshka", CONFIGS,
                         ids=[f"{t}-{'x'.join(map(str, m))}-{s}-{c}chunks-{lay}{'-mrl' if mr else ''}"
                              for t, m, s, c, lay, mr in CONFIGS])
def test_hybrid_step_equals_the_task_loss_on_the_encoder_output(task, mesh_shape, strategy, num_chunks, layout,
                                                               matryoshka):
    data, fsdp, tensor = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, strategy=strategy))
    assert mesh.devices.size == 8
    loss_cfg = LossConfig(**{**LOSS.__dict__, "num_chunks": num_chunks, **(MATRYOSHKA if matryoshka else {})})
    optimizer = make_optimizer(OPT, total_steps=10)
    step = make_train_step(CFG, loss_cfg, optimizer, mesh, strategy)
    batch = make_batch(task)
    if layout == "packed":  # several texts per row (rows twice the padded lengths), task arrays alongside
        packed = pack_padded(batch, data * fsdp, num_chunks, lengths=(2 * TQ, 2 * TP))
        assert max(len(set(r[r > 0])) for r in packed["packed_document_segments"]) >= 2
        batch = {**packing.step_arrays(packed), **task_arrays(batch)}
    arrays = host_local_to_global(batch, mesh)
    state = create_train_state(CFG, optimizer, mesh, strategy, jax.random.key(0), params=host_params())
    new_state, metrics = step.lower(state, arrays, STEP_KEY, task=task).compile(FAST)(state, arrays, STEP_KEY)

    ref_loss, ref_grads = reference(task, matryoshka)
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=RTOL)
    assert float(metrics[f"loss/{task}"]) == float(metrics["loss"])
    norm = float(np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(ref_grads))))
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=RTOL)
    g_max = max(np.abs(g).max() for g in jax.tree.leaves(ref_grads))
    mu = dict(jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, adam_mu(new_state.opt_state)))[0])
    for path, g in jax.tree_util.tree_flatten_with_path(ref_grads)[0]:
        atol = GRAD_ATOL_TENSOR * np.abs(g).max() + GRAD_ATOL_GLOBAL * g_max
        np.testing.assert_allclose(mu[path] / (1 - OPT.b1), g, rtol=RTOL, atol=atol,
                                   err_msg=f"gradient {jax.tree_util.keystr(path)}")
    assert np.abs(ref_grads["dense"]["kernel"]).max() > 0  # the Dense head is trained
    if matryoshka:  # every dimension's loss is reported, per task
        assert {f"{task}/dim_{d}/loss" for d in MATRYOSHKA["matryoshka_dims"]} <= set(metrics)
    if task == "retrieval":
        assert {"retrieval/contrastive/loss", "retrieval/distill/kl", "retrieval/distill/agreement"} <= set(metrics)
    assert int(new_state.step) == 1 and int(new_state.skipped) == 0


def test_a_task_without_its_arrays_is_refused_before_compiling():
    from piccolo_jax.losses.hybrid import task_loss_fn

    with pytest.raises(ValueError, match="an sts batch needs its labels"):
        task_loss_fn(LOSS, "sts", {})
    with pytest.raises(ValueError, match="task 'ranking'"):
        task_loss_fn(LOSS, "ranking", {})
    q = jnp.ones((4, 8)) / np.sqrt(8)
    with pytest.raises(ValueError, match="a classification batch needs each record's own negatives"):
        task_loss_fn(LOSS, "classification", {})(q, q, None)


@pytest.mark.parametrize("task,weight", [("retrieval", "retrieval_weight"), ("sts", "sts_weight"),
                                         ("classification", "classification_weight")])
def test_each_task_loss_is_its_weight_times_the_task_loss(task, weight):
    """loss and embedding gradients of `hybrid.task_loss_fn` with weight w = w x those of the task's own
    loss function (each proven against sentence-transformers / numpy in test_losses, test_task_losses)."""
    from piccolo_jax.losses import hybrid

    rng = np.random.default_rng(5)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, p = (unit(rng.normal(size=(8, 16))).astype(np.float32) for _ in range(2))
    negs = unit(rng.normal(size=(8, 3, 16))).astype(np.float32)
    labels = rng.uniform(0, 5, size=8).astype(np.float32)
    cfg = LossConfig(kind="hard_negative", temperature=0.05, **{weight: 2.5})
    own = {"retrieval": lambda q, p, n: losses.hard_negative_loss(q, p, n, cfg.temperature, block_size=cfg.block_size),
           "sts": lambda q, p, n: task_losses.cosent_loss(q, p, jnp.asarray(labels), cfg.sts_temperature),
           "classification": lambda q, p, n: task_losses.own_negatives_loss(q, p, n, cfg.classification_temperature)}
    fn = hybrid.task_loss_fn(cfg, task, {"labels": jnp.asarray(labels)})
    got, got_grads = jax.value_and_grad(lambda *e: fn(*e)[0], (0, 1, 2))(q, p, negs)
    want, want_grads = jax.value_and_grad(lambda *e: own[task](*e)[0], (0, 1, 2))(q, p, negs)
    np.testing.assert_allclose(float(got), 2.5 * float(want), rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), 2.5 * np.asarray(w), rtol=1e-5, atol=1e-7)

"""Cross-lowering on CPU: the encoder and the train step lower for TPU, the fused-attention path for CUDA,
the arguments we give cuDNN pass cuDNN's own checks, and bfloat16 matmuls stay bfloat16 in the HLO."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from piccolo_jax.config.model import ModelConfig
from piccolo_jax.model import attention
from piccolo_jax.model.bert import encode, init_params
from piccolo_jax.parallel.sharding import MeshConfig, make_mesh
from piccolo_jax.training.memory import abstract_batch, abstract_train_state
from piccolo_jax.training.optim import OptimConfig, make_optimizer
from piccolo_jax.training.step import LossConfig, make_train_step

TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=112,
            max_position_embeddings=64)
BF16 = ModelConfig(**TINY, compute_dtype="bfloat16", remat="full")
B, T = 8, 32


def _ids_mask():
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    return ids, ids


def _abstract_params(cfg):
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def _train_step_and_args(cfg, strategy="zero1", devices=8, num_chunks=2):
    mesh = make_mesh(MeshConfig(data=devices, strategy=strategy), devices=jax.devices()[:devices])
    optimizer = make_optimizer(OptimConfig(), total_steps=10)
    step = make_train_step(cfg, LossConfig(kind="gte", num_chunks=num_chunks), optimizer, mesh, strategy)
    args = (abstract_train_state(cfg, optimizer, mesh, strategy), abstract_batch(mesh, 16, 16, 32, 2),
            jax.random.key(0))
    return step, args


def _custom_calls(text: str) -> set[str]:
    return set(re.findall(r"custom_call @([\w$]+)", text))


# ------------------------------------------------------------------------------------------------ TPU
def test_encoder_and_train_step_lower_for_tpu():
    params = _abstract_params(BF16)
    enc = jax.export.export(jax.jit(lambda p, i, m: encode(BF16, p, i, m)["embeddings"]), platforms=("tpu",))
    exported = enc(params, *_ids_mask())
    assert exported.platforms == ("tpu",) and exported.out_avals[0].shape == (B, BF16.hidden_size)
    step, args = _train_step_and_args(BF16)  # 8 data-parallel devices, ZeRO-1, 2 gradient-caching chunks
    exported = jax.export.export(step, platforms=("tpu",))(*args)
    assert exported.platforms == ("tpu",) and exported.nr_devices == 8
    assert "stablehlo.while" in exported.mlir_module()  # the scanned layers (and chunks) stay loops


# ------------------------------------------------------------------------------------------------ CUDA
FUSED = ModelConfig(**TINY, compute_dtype="bfloat16", attention="cudnn", attention_probs_dropout_prob=0.0)


def test_attention_path_selection():
    assert attention.attention_path(BF16, training=False) == "explicit"  # auto on a CPU backend
    assert "backend cpu" in attention.describe_attention(BF16, training=False)
    assert "attention_probs_dropout_prob=0.1" in attention.describe_attention(BF16, training=True)
    assert attention.attention_path(FUSED, training=True) == "cudnn"  # requested, and nothing blocks it
    assert "cuDNN fused" in attention.describe_attention(FUSED, training=True)
    with pytest.raises(ValueError, match="attention_probs_dropout_prob=0.1"):
        attention.attention_path(BF16.replace(attention="cudnn"), training=True)
    with pytest.raises(ValueError, match="compute_dtype=float32"):
        attention.attention_path(FUSED.replace(compute_dtype="float32"), training=False)
    with pytest.raises(ValueError, match="head_dim=4"):
        attention.attention_path(FUSED.replace(num_attention_heads=16), training=False)
    assert attention.attention_path(BF16.replace(attention="explicit"), training=False) == "explicit"


def test_fused_attention_arguments_pass_cudnns_checks(monkeypatch):
    """Record what the model hands jax.nn.dot_product_attention and hold it to the conditions of JAX's cuDNN
    implementation (jax/_src/cudnn/fused_attention_stablehlo.py: check_layout, check_is_flash_attention and
    the public wrapper's shape checks); the recorded call then runs through XLA, so the fused path's numbers
    are also compared with the explicit path at every real token."""
    calls = []
    original = jax.nn.dot_product_attention

    def record(query, key, value, bias=None, mask=None, **kw):
        calls.append(dict(q=query, k=key, v=value, bias=bias, mask=mask, **kw))
        kw["implementation"] = "xla"
        return original(query, key, value, bias, mask, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    rng = np.random.default_rng(0)
    lengths = np.array([32, 1, 17, 5, 32, 9, 2, 30])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)  # right padding
    ids = np.where(mask == 1, rng.integers(1, 97, (B, T)), 0).astype(np.int32)
    params = init_params(FUSED, jax.random.key(0))
    fused = encode(FUSED, params, ids, mask)
    assert len(calls) == FUSED.num_hidden_layers or len(calls) == 1  # traced once inside the layer scan
    for c in calls:
        q, k, v = c["q"], c["k"], c["v"]
        assert c["implementation"] == "cudnn" and not c.get("is_causal", False)
        assert q.ndim == k.ndim == v.ndim == 4 and q.shape == k.shape == v.shape  # BTNH, same T for q and kv
        assert q.dtype == k.dtype == v.dtype == jnp.bfloat16  # cuDNN: fp16 / bf16 (fp8) only
        b, t, n, h = q.shape
        assert (b, t, n, h) == (B, T, FUSED.num_attention_heads, FUSED.head_dim)
        assert h % 8 == 0 and h <= 128  # flash attention's head-dim rule (256 from Hopper on)
        assert c["bias"] is None and c["mask"] is None  # padding only as sequence lengths (no [B,1,1,T] bias)
        for name in ("query_seq_lengths", "key_value_seq_lengths"):
            lens = c[name]
            assert lens.dtype == jnp.int32 and lens.shape == (B,), name  # int32, rank 1, batch of Q
        assert c.get("scale") is None  # default 1/sqrt(H)
    explicit = encode(FUSED.replace(attention="explicit"), params, ids, mask)
    np.testing.assert_allclose(np.asarray(fused["embeddings"]), np.asarray(explicit["embeddings"]), atol=2e-2)
    h_fused = np.asarray(fused["last_hidden_state"], np.float32)
    h_expl = np.asarray(explicit["last_hidden_state"], np.float32)
    valid = mask.astype(bool)
    np.testing.assert_allclose(h_fused[valid], h_expl[valid], atol=0.1)
    assert np.isfinite(h_fused).all()


def _cuda_lowering_or_skip(fn, *args):
    """StableHLO of `fn` lowered for CUDA (not serialized: cuDNN's custom calls and their sharding rule are
    not export-stable, so `jax.export` refuses them; `Traced.lower(lowering_platforms=...)` does not)."""
    try:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:
        if "cuDNN" in str(e):
            pytest.skip(f"lowering for CUDA needs the cuDNN library (jax-cuda12-plugin + nvidia-cudnn-cu12): {e}")
        raise


def test_encoder_and_train_step_lower_for_cuda_with_fused_attention():
    params = _abstract_params(FUSED)
    text = _cuda_lowering_or_skip(lambda p, i, m: encode(FUSED, p, i, m)["embeddings"], params, *_ids_mask())
    assert "__cudnn$fmhaSoftmax" in _custom_calls(text)
    step, args = _train_step_and_args(FUSED.replace(hidden_dropout_prob=0.1))  # hidden dropout is fine
    calls = _custom_calls(_cuda_lowering_or_skip(step, *args))
    assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= calls, calls


# -------------------------------------------------------------------------------------------- bfloat16
_DOT = re.compile(r"stablehlo\.dot_general .*?: \(tensor<([^>]*)>, tensor<([^>]*)>\) -> tensor<([^>]*)>")


def _dots(text: str) -> list[tuple[str, str, str]]:
    return [tuple(x.rsplit("x", 1)[-1] for x in m.groups()) for m in _DOT.finditer(text)]


def test_bfloat16_matmuls_stay_bfloat16_forward_and_backward():
    """Every matmul of the encoder's forward + backward in bfloat16 compute reads bf16 x bf16 (attention
    scores with float32 output); none is float32 x float32."""
    cfg = BF16.replace(pooling="none")  # pooling (a float32 weighted sum) is not an encoder matmul

    def loss(p, ids, mask):
        return jnp.sum(encode(cfg, p, ids, mask, dropout_key=jax.random.key(0))["embeddings"] ** 2)

    text = jax.jit(jax.grad(loss)).lower(_abstract_params(cfg), *_ids_mask()).as_text()
    dots = _dots(text)
    # Per layer: 6 dense matmuls x 3 (forward, input and weight gradients) + 2 attention products x 3.
    assert len(dots) >= 24, dots
    assert all(a == b == "bf16" for a, b, _ in dots), sorted(set(dots))
    assert ("bf16", "bf16", "f32") in dots  # the score product (and its transposes) accumulate into float32


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="runs cuDNN: needs an NVIDIA GPU")
def test_fused_attention_runs_and_matches_explicit_on_gpu():
    """On a GPU: the cuDNN kernel's embeddings and gradients against the explicit path (bfloat16 both)."""
    rng = np.random.default_rng(1)
    lengths = np.array([32, 1, 17, 5, 32, 9, 2, 30])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, 97, (B, T)), 0).astype(np.int32)
    params = init_params(FUSED, jax.random.key(0))

    def loss(p, cfg):
        return jnp.sum(encode(cfg, p, ids, mask, dropout_key=jax.random.key(3))["embeddings"][:, :8] ** 2)

    fused, explicit = FUSED.replace(attention="auto"), FUSED.replace(attention="explicit")
    assert attention.attention_path(fused, training=True) == "cudnn"
    text = jax.jit(jax.grad(loss), static_argnums=1).lower(params, fused).as_text()
    assert "__cudnn$fmhaSoftmax" in _custom_calls(text)
    np.testing.assert_allclose(np.asarray(encode(fused, params, ids, mask)["embeddings"]),
                               np.asarray(encode(explicit, params, ids, mask)["embeddings"]), atol=2e-2)
    g_f, g_e = (jax.jit(jax.grad(loss), static_argnums=1)(params, c) for c in (fused, explicit))
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_e)):
        scale = float(np.abs(np.asarray(b)).max()) + 1e-6
        assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= 0.05 * scale

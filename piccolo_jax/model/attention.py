"""Self-attention inside each text: fused kernels where they can run, an explicit XLA one elsewhere.

Every path computes softmax(q k^T / sqrt(H) + mask) v over q, k, v [B, T, N, H], where a token sees the
tokens of its own text only: in the padded layout the real tokens of its row (right padding), in the
packed layout the tokens of its segment (segment ids [B, T], text slot + 1, 0 = padding; block-diagonal).

  "cudnn"     `jax.nn.dot_product_attention(..., implementation="cudnn")`: cuDNN flash attention, the
              [B, N, T, T] scores are never stored (at the finetune chunk, 1,024 passages x 512 tokens x 12
              heads, one float32 score tensor is 12 GiB). Padded rows go in as int32 [B] sequence lengths
              (`query_seq_lengths` = `key_value_seq_lengths`); packed rows as the boolean segment mask
              [B, 1, T, T] (JAX's public API has no packed-offsets layout; the mask enters cuDNN as a bias).
              cuDNN's conditions: q, k, v bfloat16 (or float16) in [B, T, N, H], H <= 128 (256 from Hopper
              on) and a multiple of 8; the JAX API has no dropout on the probabilities.
  "splash"    TPU: Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) with
              `SegmentIds` (padded rows: segment 1 for real tokens, 0 for padding), vmapped over rows; blocks
              of 128 tokens, so rows whose length is a multiple of 128; no dropout on the probabilities.
              Checked against the explicit path in Pallas' interpret mode on CPU (tests/test_packing.py).
  "explicit"  two einsums around a float32 softmax, the mask as an additive bias: CPU, float32 compute,
              other lengths, and training with dropout on the attention probabilities.

Fused paths set the outputs at padding positions to 0 (they are not BERT's there; pooling never reads
them). `attention_path` picks one (`ModelConfig.attention`: "auto" takes cudnn on an NVIDIA GPU of compute
capability >= 8.0 for bfloat16 compute, splash on a TPU, each only without attention-probability dropout,
i.e. inference, or training with attention_probs_dropout_prob = 0), `describe_attention` is the line the
trainer logs.

bfloat16 matmuls stay bfloat16: the score product is bf16 x bf16 with float32 output (logits and softmax in
float32), and its backward first rounds the float32 score gradient to bf16, so both backward products are
bf16 x bf16 -> f32 as well, instead of float32 x float32 matmuls (TF32 at best on a GPU).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_CUDNN_DTYPES = ("bfloat16",)
SPLASH_BLOCK = 128  # splash attention's block (and lane) size: rows must be a multiple of it


def _no_probs_dropout(cfg, training: bool) -> str | None:
    if training and cfg.attention_probs_dropout_prob > 0:
        return (f"attention_probs_dropout_prob={cfg.attention_probs_dropout_prob} in training (the fused call "
                "has no dropout on the probabilities)")
    return None


def _fused_blocker(cfg, training: bool) -> str | None:
    """Why cuDNN's fused attention cannot take this config (None when it can)."""
    if cfg.compute_dtype not in _CUDNN_DTYPES:
        return f"compute_dtype={cfg.compute_dtype} (cuDNN flash attention takes bfloat16)"
    blocker = _no_probs_dropout(cfg, training)
    if blocker:
        return blocker
    h = cfg.head_dim
    if h % 8 or h > 128:
        return f"head_dim={h} (cuDNN needs a multiple of 8, at most 128)"
    return None


def _nvidia_ampere_or_later() -> bool:
    """The default backend is an NVIDIA GPU of compute capability >= 8.0 (cuDNN flash attention's floor)."""
    if jax.default_backend() != "gpu":
        return False
    capability = getattr(jax.devices()[0], "compute_capability", None)  # CUDA devices only (not ROCm)
    try:
        return capability is not None and tuple(int(x) for x in str(capability).split(".")[:2]) >= (8, 0)
    except ValueError:
        return False


def attention_path(cfg, training: bool, packed: bool = False, seq_len: int | None = None) -> str:
    """ "cudnn", "splash" or "explicit" for this model config (`cfg.attention`) in training or inference.

    `training` means dropout is on (a dropout key is given); `packed` that rows hold several texts;
    `seq_len` the row length (splash needs a multiple of 128; None: not known yet). "cudnn" requested where
    cuDNN cannot run it raises ValueError naming the reason.
    """
    blocker = _fused_blocker(cfg, training)
    if cfg.attention == "explicit":
        return "explicit"
    if cfg.attention == "cudnn":
        if blocker:
            raise ValueError(f"model.attention='cudnn' cannot run with {blocker}; use 'auto' or 'explicit'")
        return "cudnn"
    if jax.default_backend() == "tpu":
        fits = seq_len is None or seq_len % SPLASH_BLOCK == 0
        return "splash" if fits and _no_probs_dropout(cfg, training) is None else "explicit"
    return "cudnn" if blocker is None and _nvidia_ampere_or_later() else "explicit"


def describe_attention(cfg, training: bool = True, packed: bool = False) -> str:
    """One log line: which attention runs, and why."""
    path = attention_path(cfg, training, packed)
    when = ("training" if training else "inference") + (", packed texts" if packed else "")
    if path == "cudnn":
        how = "segment mask" if packed else "padding as sequence lengths"
        return f"attention ({when}): cuDNN fused flash attention (bfloat16, {how})"
    if path == "splash":
        return (f"attention ({when}): TPU splash attention with segment ids for rows of a multiple of "
                f"{SPLASH_BLOCK} tokens, explicit XLA attention for other rows")
    blocker = _no_probs_dropout(cfg, training) if jax.default_backend() == "tpu" else _fused_blocker(cfg, training)
    if cfg.attention == "explicit":
        reason = "model.attention='explicit'"
    elif blocker:
        reason = blocker
    else:
        reason = (f"backend {jax.default_backend()} (cuDNN needs an NVIDIA GPU, compute capability >= 8.0; "
                  "splash a TPU)")
    mask = "segment-mask" if packed else "padding-mask"
    return f"attention ({when}): explicit XLA softmax attention with a {mask} bias; not fused because {reason}"


def fused_attention(q_btnh: jax.Array, k_btnh: jax.Array, v_btnh: jax.Array, valid_bt: jax.Array,
                    lengths_b: jax.Array | None, segments_bt: jax.Array | None, path: str = "cudnn") -> jax.Array:
    """cuDNN (padded rows as right-padded lengths [B] int32, packed rows as a segment mask) or splash
    attention (segment ids); o [B, T, N, H], 0 at padding."""
    if path == "splash":
        o_btnh = splash_attention(q_btnh, k_btnh, v_btnh, valid_bt.astype(jnp.int32) if segments_bt is None
                                  else segments_bt)
    elif segments_bt is None:
        o_btnh = jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, query_seq_lengths=lengths_b,
                                              key_value_seq_lengths=lengths_b, implementation="cudnn")
    else:
        o_btnh = jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, mask=segment_mask(segments_bt)[:, None],
                                              implementation="cudnn")
    return jnp.where(valid_bt[:, :, None, None], o_btnh, jnp.zeros_like(o_btnh))


def segment_mask(segments_bt: jax.Array) -> jax.Array:
    """[B, T, S] bool: token t sees token s when both belong to the same text (segment id > 0)."""
    return (segments_bt[:, :, None] == segments_bt[:, None, :]) & (segments_bt[:, None, :] > 0)


def splash_attention(q_btnh, k_btnh, v_btnh, segments_bt, interpret: bool = False) -> jax.Array:
    """TPU splash attention of every row, tokens attending within equal segment ids; o [B, T, N, H].

    `interpret=True` runs the Pallas kernel in interpret mode (any backend; for tests).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    _, t, n, h = q_btnh.shape
    if t % SPLASH_BLOCK:
        raise ValueError(f"splash attention needs rows of a multiple of {SPLASH_BLOCK} tokens, got {t}")
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((t, t))] * n), head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    scale = jnp.asarray(h ** -0.5, q_btnh.dtype)

    def row(q_tnh, k_tnh, v_tnh, seg_t):
        heads = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731  [T, N, H] -> [N, T, H]
        o_nth = kernel(heads(q_tnh * scale), heads(k_tnh), heads(v_tnh), segment_ids=sk.SegmentIds(seg_t, seg_t))
        return jnp.swapaxes(o_nth, 0, 1)

    return jax.vmap(row)(q_btnh, k_btnh, v_btnh, segments_bt)


@jax.custom_vjp
def _scores_bf16(q_bnth: jax.Array, k_bnsh: jax.Array) -> jax.Array:
    """s = q k^T: bf16 x bf16 -> float32, and a backward of bf16 x bf16 -> f32 products (module docstring)."""
    return jnp.einsum("bnth,bnsh->bnts", q_bnth, k_bnsh, preferred_element_type=jnp.float32)


def _scores_fwd(q_bnth, k_bnsh):
    return _scores_bf16(q_bnth, k_bnsh), (q_bnth, k_bnsh)


def _scores_bwd(res, ds_bnts):
    q_bnth, k_bnsh = res
    ds_bnts = ds_bnts.astype(q_bnth.dtype)  # float32 -> bf16 before the products, as the forward's inputs
    dq = jnp.einsum("bnts,bnsh->bnth", ds_bnts, k_bnsh, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bnts,bnth->bnsh", ds_bnts, q_bnth, preferred_element_type=jnp.float32)
    return dq.astype(q_bnth.dtype), dk.astype(k_bnsh.dtype)


_scores_bf16.defvjp(_scores_fwd, _scores_bwd)


def explicit_attention(q_btnh: jax.Array, k_btnh: jax.Array, v_btnh: jax.Array, valid_bt: jax.Array,
                       probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
                       segments_bt: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(H) + bias) v with float32 logits; `probs_dropout` applied to the probabilities.

    Heads-major layout [B, N, T, H] for both products, the 1/sqrt(H) scale folded into q and the mask as
    an additive bias: padding as a row bias [B, 1, 1, S] (any mask, not only right padding), packed texts
    as the block-diagonal [B, 1, T, S] of `segment_mask` (a masked score is the most negative float32, so
    its probability is exactly 0 and each text's softmax is its padded one). On XLA:CPU this block measured
    1.3-2.3x faster than jax.nn.dot_product_attention forward and 1.4-1.8x forward + backward (B 32, T 64
    and 128, 12 heads); its forward compiles to a single fused kernel.
    """
    head_dim = q_btnh.shape[-1]
    q_bnth = jnp.swapaxes(q_btnh * jnp.asarray(head_dim ** -0.5, q_btnh.dtype), 1, 2)
    k_bnsh, v_bnsh = jnp.swapaxes(k_btnh, 1, 2), jnp.swapaxes(v_btnh, 1, 2)
    if q_bnth.dtype == jnp.bfloat16:
        s_bnts = _scores_bf16(q_bnth, k_bnsh)
    else:
        s_bnts = jnp.einsum("bnth,bnsh->bnts", q_bnth, k_bnsh, preferred_element_type=jnp.float32)
    allowed = valid_bt[:, None, :] if segments_bt is None else segment_mask(segments_bt)
    bias_b1ts = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None]
    p_bnts = jax.nn.softmax(s_bnts + bias_b1ts, axis=-1)
    if probs_dropout is not None:
        p_bnts = probs_dropout(p_bnts)
    o_bnth = jnp.einsum("bnts,bnsh->bnth", p_bnts.astype(v_bnsh.dtype), v_bnsh)
    return jnp.swapaxes(o_bnth, 1, 2)

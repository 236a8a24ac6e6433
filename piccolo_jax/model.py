"""Flax NNX BERT encoder with piccolo's pooling (mean over non-padding tokens, then L2 normalisation).

Numerically this is transformers' `BertModel`: post-LayerNorm blocks, exact (erf) GELU, learned absolute
positions, padding-masked self-attention. Every parameter carries logical axis names (``"vocab"``,
``"embed"``, ``"heads"``, ``"mlp"``, ...); `piccolo_jax.sharding` maps them onto mesh axes.

The module is driven functionally: `abstract_model` gives the graph definition and abstract parameters
once, parameters live as a plain nested dict of arrays, and `encode` merges them back in a pure function.
Dropout randomness is an explicit key (derived per layer and per site with `fold_in`), so the same key
always reproduces the same masks, which gradient caching relies on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from piccolo_jax.model_config import ModelConfig

Params = dict[str, Any]

# Dropout sites inside one block; folded into the layer key so that no two sites share a mask.
_SITE_ATTN_PROBS, _SITE_ATTN_OUT, _SITE_FFN_OUT = 0, 1, 2
_EMBED_KEY_INDEX = 1_000_000  # distinct from every layer index


def _init(std: float, names: tuple[str, ...]):
    return nnx.with_partitioning(nnx.initializers.normal(std), names)


def _zeros(names: tuple[str, ...]):
    return nnx.with_partitioning(nnx.initializers.zeros_init(), names)


def _ones(names: tuple[str, ...]):
    return nnx.with_partitioning(nnx.initializers.ones_init(), names)


def _fold(keys_b: jax.Array | None, i: int) -> jax.Array | None:
    """Derive a new key per row: fold `i` into each of the B row keys."""
    return None if keys_b is None else jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_b, i)


def _dropout(x_b: jax.Array, rate: float, keys_b: jax.Array | None) -> jax.Array:
    """Inverted dropout with one key per batch row; identity when `keys_b` is None or the rate is zero.

    Row-wise keys make the masks independent of how the batch is chunked or sharded: row r gets the same
    mask whether it is encoded in a batch of 32,768 or in a chunk of 2,048 (gradient caching relies on it).
    """
    if keys_b is None or rate <= 0.0:
        return x_b
    keep_b = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, x_b.shape[1:]))(keys_b)
    return jnp.where(keep_b, x_b / (1.0 - rate), jnp.zeros_like(x_b)).astype(x_b.dtype)


def row_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
    """One dropout key per global row index: fold_in(key, row)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 whatever the compute dtype, output cast back to it."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = nnx.Param(_ones(("embed",))(None, (dim,), jnp.float32))
        self.bias = nnx.Param(_zeros(("embed",))(None, (dim,), jnp.float32))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x32 = x_btd.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x_btd.dtype)


class Embeddings(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_init(std, ("vocab", "embed")),
                              rngs=rngs)
        self.position = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                  embedding_init=_init(std, ("positions", "embed")), rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size,
                                    embedding_init=_init(std, ("token_types", "embed")), rngs=rngs)
        self.norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, input_ids_bt, token_type_ids_bt, dtype) -> jax.Array:
        seq_len = input_ids_bt.shape[1]
        x_btd = jnp.take(self.word.embedding[...], input_ids_bt, axis=0)
        x_btd = x_btd + self.position.embedding[...][:seq_len][None]
        if token_type_ids_bt is None:  # all segment 0: add row 0 instead of gathering
            x_btd = x_btd + self.token_type.embedding[...][0]
        else:
            x_btd = x_btd + jnp.take(self.token_type.embedding[...], token_type_ids_bt, axis=0)
        return self.norm(x_btd).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel [in, out] float32, computed in `dtype`."""

    def __init__(self, d_in: int, d_out: int, names: tuple[str, str], std: float, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(std, names)(rngs.params(), (d_in, d_out), jnp.float32))
        self.bias = nnx.Param(_zeros((names[1],))(None, (d_out,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(x.dtype)
        return jnp.dot(x, k) + self.bias[...].astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, std = cfg.hidden_size, cfg.initializer_range
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.probs_dropout = cfg.attention_probs_dropout_prob
        self.query = Dense(d, d, ("embed", "heads"), std, rngs)
        self.key = Dense(d, d, ("embed", "heads"), std, rngs)
        self.value = Dense(d, d, ("embed", "heads"), std, rngs)
        self.output = Dense(d, d, ("heads", "embed"), std, rngs)

    def __call__(self, x_btd, valid_bt, key) -> jax.Array:
        b, t, d = x_btd.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # noqa: E731
        q_btnh, k_btnh, v_btnh = split(self.query(x_btd)), split(self.key(x_btd)), split(self.value(x_btd))
        mask_b11s = valid_bt[:, None, None, :]
        probs_key = _fold(key, _SITE_ATTN_PROBS)
        if probs_key is None or self.probs_dropout <= 0.0:
            # Fused path (cuDNN flash attention on GPU when dtypes allow; XLA elsewhere).
            o_btnh = jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, mask=mask_b11s)
        else:
            # Training with attention-probability dropout, which the fused kernel does not offer.
            scale = self.head_dim ** -0.5
            s_bnts = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_btnh, preferred_element_type=jnp.float32) * scale
            s_bnts = jnp.where(mask_b11s, s_bnts, jnp.finfo(jnp.float32).min)
            p_bnts = _dropout(jax.nn.softmax(s_bnts, axis=-1), self.probs_dropout, probs_key)
            o_btnh = jnp.einsum("bnts,bsnh->btnh", p_bnts.astype(v_btnh.dtype), v_btnh)
        return self.output(o_btnh.reshape(b, t, d))


class Layer(nnx.Module):
    """One post-LN BERT block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.hidden_dropout = cfg.hidden_dropout_prob
        self.attention = Attention(cfg, rngs)
        self.attention_norm = LayerNorm(d, cfg.layer_norm_eps)
        self.ffn_in = Dense(d, f, ("embed", "mlp"), std, rngs)
        self.ffn_out = Dense(f, d, ("mlp", "embed"), std, rngs)
        self.ffn_norm = LayerNorm(d, cfg.layer_norm_eps)

    def __call__(self, x_btd, valid_bt, key):
        a_btd = _dropout(self.attention(x_btd, valid_bt, key), self.hidden_dropout, _fold(key, _SITE_ATTN_OUT))
        x_btd = self.attention_norm(x_btd + a_btd)
        h_btf = jax.nn.gelu(self.ffn_in(x_btd), approximate=False)
        h_btd = _dropout(self.ffn_out(h_btf), self.hidden_dropout, _fold(key, _SITE_FFN_OUT))
        return self.ffn_norm(x_btd + h_btd)


def _run_layer(layer: Layer, x_btd, valid_bt, key):
    return layer(x_btd, valid_bt, key)


_run_layer_remat = nnx.remat(_run_layer)


class BertEncoder(nnx.Module):
    """BERT encoder; `__call__` returns the hidden states, pooled/normalised embedding and pooler output."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.layers = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        if cfg.add_pooler:
            self.pooler = Dense(cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), cfg.initializer_range,
                                rngs)

    def __call__(self, input_ids_bt, attention_mask_bt, token_type_ids_bt=None, dropout_key=None,
                 with_pooler: bool = False) -> dict[str, jax.Array]:
        cfg = self.cfg
        dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
        valid_bt = attention_mask_bt.astype(bool)
        x_btd = self.embeddings(input_ids_bt, token_type_ids_bt, dtype)
        keys_b = dropout_key
        if keys_b is not None and keys_b.ndim == 0:  # one key for the batch: derive row keys 0..B-1
            keys_b = row_keys(keys_b, jnp.arange(input_ids_bt.shape[0]))
        x_btd = _dropout(x_btd, cfg.hidden_dropout_prob, _fold(keys_b, _EMBED_KEY_INDEX))
        run = _run_layer_remat if cfg.remat else _run_layer
        for i, layer in enumerate(self.layers):
            x_btd = run(layer, x_btd, valid_bt, _fold(keys_b, i))
        out = {"last_hidden_state": x_btd}
        out["embeddings"] = pool(x_btd, valid_bt, cfg.pooling, cfg.normalize)
        if with_pooler and cfg.add_pooler:
            out["pooler_output"] = jnp.tanh(self.pooler(x_btd[:, 0]).astype(jnp.float32))
        return out


def pool(h_btd: jax.Array, valid_bt: jax.Array, pooling: str, normalize: bool) -> jax.Array:
    """Sentence embedding [B, D] in float32: mean over valid tokens (sum / count), or [CLS]."""
    h32_btd = h_btd.astype(jnp.float32)
    if pooling == "mean":
        w_bt = valid_bt.astype(jnp.float32)
        count_b1 = jnp.maximum(jnp.sum(w_bt, axis=1, keepdims=True), 1e-9)  # as sentence-transformers
        e_bd = jnp.einsum("btd,bt->bd", h32_btd, w_bt) / count_b1
    elif pooling == "cls":
        e_bd = h32_btd[:, 0]
    else:
        return h32_btd
    if normalize:  # torch.nn.functional.normalize: x / max(||x||, 1e-12)
        e_bd = e_bd / jnp.maximum(jnp.linalg.norm(e_bd, axis=-1, keepdims=True), 1e-12)
    return e_bd


# ---------------------------------------------------------------------------------------------- functional API
def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, Params, Params]:
    """Graph definition, abstract parameters (ShapeDtypeStructs) and logical axis names, allocating nothing."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: BertEncoder(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    abstract = nnx.to_pure_dict(state)
    logical = jax.tree.map(
        lambda spec: tuple(spec), nnx.to_pure_dict(nnx.get_partition_spec(state)),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    return graphdef, abstract, logical


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random BERT initialisation (normal(0, initializer_range) weights, zero biases, unit LN scales).

    Call under `jax.jit(..., out_shardings=...)` to create the parameters already sharded.
    """
    with nnx.use_eager_sharding(False):
        model = BertEncoder(cfg, nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.split(model)[1])


_GRAPHDEFS: dict[ModelConfig, nnx.GraphDef] = {}


def _merge(cfg: ModelConfig, params: Params) -> BertEncoder:
    """Module view of a parameter dict (the graph definition is built once per config)."""
    if cfg not in _GRAPHDEFS:
        _GRAPHDEFS[cfg] = abstract_model(cfg)[0]
    return nnx.merge(_GRAPHDEFS[cfg], params)


def encode(cfg: ModelConfig, params: Params, input_ids_bt: jax.Array, attention_mask_bt: jax.Array,
           token_type_ids_bt: jax.Array | None = None, dropout_key: jax.Array | None = None,
           with_pooler: bool = False) -> dict[str, jax.Array]:
    """Pure forward pass: params (nested dict) + token ids -> {"last_hidden_state", "embeddings", ...}.

    `dropout_key=None` is inference (deterministic). A key turns every dropout site on: either one key
    (rows get fold_in(key, row)) or a [B] array of per-row keys (see `row_keys`), so that a row's masks do
    not depend on which batch or chunk it is encoded in.
    """
    model = _merge(cfg, params)
    return model(input_ids_bt, attention_mask_bt, token_type_ids_bt, dropout_key, with_pooler)


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))

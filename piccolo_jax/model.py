"""Flax NNX BERT encoder with piccolo's pooling (mean over non-padding tokens, then L2 normalisation).

Numerically this is transformers' `BertModel`: post-LayerNorm blocks, exact (erf) GELU, learned absolute
positions, padding-masked self-attention. Every parameter carries logical axis names (``"vocab"``,
``"embed"``, ``"heads"``, ``"mlp"``, ...); `piccolo_jax.sharding` maps them onto mesh axes.

The L blocks are one stacked layer: every block parameter has a leading [L] axis (logical name
``"layers"``, never sharded; e.g. ``layers/ffn_in/kernel`` is [L, D, F]) and the blocks run as one
`jax.lax.scan`, under `jax.checkpoint` with the configured remat policy. XLA then compiles one block and
reuses one block's buffers for every layer: the compiled per-device peak of the piccolo-base-zh pretrain
step (2,048 pairs x 128 tokens per device per chunk, bfloat16, XLA:CPU) fell from 402 GiB with 12 unrolled
blocks, each under nnx.remat, to 47 GiB (benchmarks/bench_memory.py). Remat policies (`ModelConfig.remat`):

    "none"                               keep every activation of every block for the backward pass
    "full"                               keep each block's input [B, T, D] only, recompute the rest
    "dots_saveable"                      also keep the matmul outputs (more memory, less recompute)
    "dots_with_no_batch_dims_saveable"   keep the dense-layer outputs, recompute attention

The module is driven functionally: `abstract_model` gives the graph definition and abstract parameters
once, parameters live as a plain nested dict of arrays, and `encode` merges them back in a pure function.
Dropout randomness is an explicit key (row key, then fold_in(row_key, layer), then fold_in(., site)),
so the same key always reproduces the same masks, which gradient caching relies on.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from piccolo_jax import attention
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
    keep_b = _bernoulli_rows(keys_b, 1.0 - rate, x_b.shape[1:])
    return jnp.where(keep_b, x_b / (1.0 - rate), jnp.zeros_like(x_b)).astype(x_b.dtype)


def _bernoulli_rows(keys_b: jax.Array, p: float, row_shape: tuple[int, ...]) -> jax.Array:
    """[B, *row_shape] booleans, row b = jax.random.bernoulli(keys_b[b], p, row_shape), bit for bit.

    For threefry keys (JAX's default, partitionable bits) the generator is written out as elementwise uint32
    arithmetic, which XLA fuses into the consumer: jax.random's own CPU lowering runs threefry as a rolled
    loop over whole arrays, and on CPU that made dropout masks cost about 9x as much (memory traffic of
    ten passes over uint32 state per site). Any other key type takes jax.random itself.
    """
    size = math.prod(row_shape)
    fast = (jax.dtypes.issubdtype(keys_b.dtype, jax.dtypes.prng_key)
            and str(jax.random.key_impl(keys_b)) == "threefry2x32"
            and jax.config.jax_threefry_partitionable and size < 2 ** 32)
    if not fast:
        return jax.vmap(lambda k: jax.random.bernoulli(k, p, row_shape))(keys_b)
    shape = (keys_b.shape[0], *row_shape)
    # Counter of element (b, i...) within its row: the row-major flat index (jax.random's iota_2x32_shape,
    # whose high word is 0 below 2^32 elements).
    counter = jnp.zeros(shape, jnp.uint32)
    for axis, stride in enumerate(_strides(row_shape), start=1):
        counter = counter + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    key_data = jax.random.key_data(keys_b).reshape(shape[0], *([1] * len(row_shape)), 2)
    bits1, bits2 = _threefry2x32(key_data[..., 0], key_data[..., 1], jnp.zeros_like(counter), counter)
    bits = bits1 ^ bits2
    # jax.random.uniform's float32 construction from 32 random bits, then bernoulli's comparison.
    u = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
    return u < jnp.float32(p)


def _strides(shape: tuple[int, ...]) -> list[int]:
    return [math.prod(shape[i + 1:]) for i in range(len(shape))]


def _threefry2x32(k0, k1, x0, x1):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), as jax.random computes it, unrolled."""
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


@jax.custom_vjp
def _gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x Φ(x) = x/2 (1 + erf(x / sqrt 2)), the formula of torch.nn.functional.gelu.

    The same function as jax.nn.gelu(approximate=False), which goes through erfc; erf is one rational
    polynomial on XLA:CPU (no exp, no branches), 1.4x faster there and fusable into the next matmul. The
    custom VJP keeps only x for the backward pass, dx = dy (Φ(x) + x φ(x)), computed there in one fused
    pass, instead of autodiff's forward-time derivative arrays (one extra [tokens, FFN] pass per layer).
    Being a custom VJP, it supports reverse-mode differentiation only (grad / vjp, not jvp).
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def _gelu_fwd(x):
    return _gelu(x), x


def _gelu_bwd(x, dy):
    # The barrier keeps XLA from sharing erf(x) with the forward pass (CSE would store it as a residual).
    x = jax.lax.optimization_barrier(x)
    cdf = 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))
    pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(_INV_SQRT_2PI, x.dtype)
    return (dy * (cdf + x * pdf),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)
_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


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
        # A 2-D matmul over all tokens: its weight gradient is then one [in, tokens] x [tokens, out]
        # product that XLA:CPU runs without first copying a transposed activation (the [B, T, in] form
        # made it transpose x or dy; 1.5x slower for an FFN's forward + backward at 1,024 tokens).
        y = jnp.dot(x.reshape(-1, x.shape[-1]), k) + self.bias[...].astype(x.dtype)
        return y.reshape(*x.shape[:-1], k.shape[1])


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, std = cfg.hidden_size, cfg.initializer_range
        self.cfg = cfg
        self.query = Dense(d, d, ("embed", "heads"), std, rngs)
        self.key = Dense(d, d, ("embed", "heads"), std, rngs)
        self.value = Dense(d, d, ("embed", "heads"), std, rngs)
        self.output = Dense(d, d, ("heads", "embed"), std, rngs)

    def __call__(self, x_btd, valid_bt, lengths_b, key) -> jax.Array:
        cfg, (b, t, d) = self.cfg, x_btd.shape
        split = lambda y: y.reshape(b, t, cfg.num_attention_heads, cfg.head_dim)  # noqa: E731
        q_btnh, k_btnh, v_btnh = split(self.query(x_btd)), split(self.key(x_btd)), split(self.value(x_btd))
        if attention.attention_path(cfg, training=key is not None) == "cudnn":
            o_btnh = attention.fused_attention(q_btnh, k_btnh, v_btnh, lengths_b, valid_bt)
        else:
            probs_key = _fold(key, _SITE_ATTN_PROBS)
            rate = cfg.attention_probs_dropout_prob
            drop = None if probs_key is None or rate <= 0.0 else (lambda p: _dropout(p, rate, probs_key))
            o_btnh = attention.explicit_attention(q_btnh, k_btnh, v_btnh, valid_bt, drop)
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

    def __call__(self, x_btd, valid_bt, lengths_b, key):
        a_btd = _dropout(self.attention(x_btd, valid_bt, lengths_b, key), self.hidden_dropout,
                         _fold(key, _SITE_ATTN_OUT))
        x_btd = self.attention_norm(x_btd + a_btd)
        h_btf = _gelu(self.ffn_in(x_btd))
        h_btd = _dropout(self.ffn_out(h_btf), self.hidden_dropout, _fold(key, _SITE_FFN_OUT))
        return self.ffn_norm(x_btd + h_btd)


def stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> Layer:
    """L blocks as one `Layer` whose parameters carry a leading [L] axis named "layers" (own init per block)."""
    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(layer_rngs: nnx.Rngs) -> Layer:
        return Layer(cfg, layer_rngs)
    return make(rngs)


_REMAT_POLICIES = {
    "full": None,  # nothing saveable: only the scan carry (each block's input) is kept
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_layers(layers: Layer, x_btd, valid_bt, lengths_b, keys_b, remat: str) -> jax.Array:
    """x -> block_{L-1}(... block_0(x)) as one lax.scan over the stacked parameters.

    Block i draws its dropout masks from fold_in(row_key, i), exactly as L separate blocks would.
    """
    graphdef, stacked = nnx.split(layers)
    n = jax.tree.leaves(stacked)[0].shape[0]

    def block(x_btd, xs):
        state, i = xs
        return nnx.merge(graphdef, state)(x_btd, valid_bt, lengths_b, _fold(keys_b, i)), None

    if remat != "none":
        block = jax.checkpoint(block, policy=_REMAT_POLICIES[remat], prevent_cse=False)
    x_btd, _ = jax.lax.scan(block, x_btd, (stacked, jnp.arange(n, dtype=jnp.int32)))
    return x_btd


class BertEncoder(nnx.Module):
    """BERT encoder; `__call__` returns the hidden states, pooled/normalised embedding and pooler output."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.layers = stacked_layers(cfg, rngs)
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
        lengths_b = jnp.sum(valid_bt, axis=1, dtype=jnp.int32)  # right padding: the fused kernel's lengths
        x_btd = scan_layers(self.layers, x_btd, valid_bt, lengths_b, keys_b, cfg.remat)
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


def stack_layers(params: Params) -> Params:
    """A tree saved before layers were stacked ({"layers": {0: {...}, 1: {...}}}, keys int or digit strings)
    -> today's tree ({"layers": {...}} with [L, ...] leaves); an already stacked tree is returned as it is."""
    layers = params.get("layers", {})
    if not layers or not all(str(k).isdigit() for k in layers):
        return params
    order = sorted(layers, key=int)
    if [int(k) for k in order] != list(range(len(order))):
        raise ValueError(f"layer keys {order} are not 0 .. {len(order) - 1}")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[k] for k in order))
    return {**params, "layers": stacked}


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))

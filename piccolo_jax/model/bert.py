"""Flax NNX BERT encoder with piccolo's pooling (mean over non-padding tokens, then L2 normalisation).

Numerically this is transformers' `BertModel`: post-LayerNorm blocks, exact (erf) GELU, learned absolute
positions, padding-masked self-attention. Every parameter carries logical axis names (``"vocab"``,
``"embed"``, ``"heads"``, ``"mlp"``, ...); `piccolo_jax.parallel.sharding` maps them onto mesh axes.

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

Two layouts of the same computation:

    padded  `encode`: texts [B, T] right-padded, one per row (attention_mask 1 on real tokens)
    packed  `encode_packed`: several texts per row of a block [n, R, L]: segment ids (slot + 1 of the
            text in its block, 0 = padding) keep attention inside each text, position ids restart at 0 in
            each text, token type 0; pooling is per text (`pool_segments`), giving [n, slots, D]

Every token computes what it computes in the padded layout (the same position embedding, the same keys in
attention, the same dropout masks: `piccolo_jax.model.dropout`), so the two agree to float32 rounding.

The sentence embedding is pool -> optional Dense head -> L2 normalisation (`sentence_head`): with
`dense_out_features` = E > 0 a Dense(D -> E) with bias and identity activation (piccolo v2's scaling
layer, sentence-transformers' `Dense` module) maps the pooled [.., D] vector to [.., E] in float32
(kernel logical axes ("embed", "dense_out"): split over "fsdp" on D under strategy fsdp, else replicated).

The module is driven functionally: `abstract_model` gives the graph definition and abstract parameters
once, parameters live as a plain nested dict of arrays, and `encode` merges them back in a pure function.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from piccolo_jax.config.model import ModelConfig
from piccolo_jax.io.lean_imports import hidden
from piccolo_jax.model import attention, dropout
from piccolo_jax.model.dropout import TokenKeys, row_keys  # noqa: F401  (row_keys: the public key of a row)
from piccolo_jax.model.pooling import dense_of, pool, pool_segments, sentence_head  # noqa: F401  (re-exported)

with hidden("IPython"):  # flax.nnx asks IPython whether it runs inside it: only if already loaded
    from flax import nnx

Params = dict[str, Any]


def _init(std: float, names: tuple[str, ...]):
    return nnx.with_partitioning(nnx.initializers.normal(std), names)


def _zeros(names: tuple[str, ...]):
    return nnx.with_partitioning(nnx.initializers.zeros_init(), names)


def _ones(names: tuple[str, ...]):
    return nnx.with_partitioning(nnx.initializers.ones_init(), names)


class Grid(NamedTuple):
    """What attention and dropout need to know about a [B, T] token grid."""

    valid: jax.Array  # [B, T] bool: a real token
    lengths: jax.Array | None  # [B] int32 real tokens per row (padded layout: the fused kernel's lengths)
    segments: jax.Array | None  # [B, T] int32, packed layout: text slot + 1, 0 = padding
    positions: jax.Array  # [B, T] or [1, T] int32: each token's position in its text


def _dropout(x, rate: float, keys: TokenKeys | None, *site: int) -> jax.Array:
    """Inverted dropout of x [B, T, D] with the token keys of `site` (identity without keys or rate)."""
    if keys is None or rate <= 0.0:
        return x
    return dropout.apply(x, rate, dropout.keep_hidden(keys.at(*site), 1.0 - rate, x.shape[-1]))


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

    def __call__(self, input_ids_bt, token_type_ids_bt, dtype, positions_bt=None) -> jax.Array:
        seq_len = input_ids_bt.shape[1]
        x_btd = jnp.take(self.word.embedding[...], input_ids_bt, axis=0)
        if positions_bt is None:  # padded rows: positions 0..T-1, a slice instead of a gather
            x_btd = x_btd + self.position.embedding[...][:seq_len][None]
        else:
            x_btd = x_btd + jnp.take(self.position.embedding[...], positions_bt, axis=0)
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

    def __call__(self, x_btd, grid: Grid, keys: TokenKeys | None) -> jax.Array:
        cfg, (b, t, d) = self.cfg, x_btd.shape
        split = lambda y: y.reshape(b, t, cfg.num_attention_heads, cfg.head_dim)  # noqa: E731
        q_btnh, k_btnh, v_btnh = split(self.query(x_btd)), split(self.key(x_btd)), split(self.value(x_btd))
        path = attention.attention_path(cfg, keys is not None, grid.segments is not None, seq_len=t)
        if path != "explicit":
            o_btnh = attention.fused_attention(q_btnh, k_btnh, v_btnh, grid.valid, grid.lengths, grid.segments,
                                               path)
        else:
            rate, drop = cfg.attention_probs_dropout_prob, None
            if keys is not None and rate > 0.0:
                positions_bt = jnp.broadcast_to(grid.positions, (b, t))
                keep = dropout.keep_attention(keys.at(dropout.SITE_ATTN_PROBS), positions_bt, 1.0 - rate,
                                              cfg.num_attention_heads, cfg.max_position_embeddings)
                drop = lambda p: dropout.apply(p, rate, keep)  # noqa: E731
            o_btnh = attention.explicit_attention(q_btnh, k_btnh, v_btnh, grid.valid, drop, grid.segments)
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

    def __call__(self, x_btd, grid: Grid, keys: TokenKeys | None):
        a_btd = _dropout(self.attention(x_btd, grid, keys), self.hidden_dropout, keys, dropout.SITE_ATTN_OUT)
        x_btd = self.attention_norm(x_btd + a_btd)
        h_btf = _gelu(self.ffn_in(x_btd))
        h_btd = _dropout(self.ffn_out(h_btf), self.hidden_dropout, keys, dropout.SITE_FFN_OUT)
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


def scan_layers(layers: Layer, x_btd, grid: Grid, keys: TokenKeys | None, remat: str) -> jax.Array:
    """x -> block_{L-1}(... block_0(x)) as one lax.scan over the stacked parameters.

    Block i draws its dropout masks from fold_in(row_key, i), exactly as L separate blocks would.
    """
    graphdef, stacked = nnx.split(layers)
    n = jax.tree.leaves(stacked)[0].shape[0]

    def block(x_btd, xs):
        state, i = xs
        layer_keys = None if keys is None else keys.layer(i)
        return nnx.merge(graphdef, state)(x_btd, grid, layer_keys), None

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
        if cfg.dense_out_features:  # the sentence-embedding head (module doc)
            self.dense = Dense(cfg.hidden_size, cfg.dense_out_features, ("embed", "dense_out"),
                               cfg.initializer_range, rngs)

    def __call__(self, input_ids_bt, attention_mask_bt, token_type_ids_bt=None, dropout_key=None,
                 with_pooler: bool = False, positions_bt=None, segments_bt=None) -> dict[str, jax.Array]:
        """Padded rows (attention_mask) or, with `segments_bt` and `positions_bt`, packed rows."""
        cfg = self.cfg
        dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
        b, t = input_ids_bt.shape
        packed = segments_bt is not None
        if packed:
            grid = Grid(segments_bt > 0, None, segments_bt, positions_bt)
        else:
            valid_bt = attention_mask_bt.astype(bool)
            lengths_b = jnp.sum(valid_bt, axis=1, dtype=jnp.int32)  # right padding: the fused kernel's lengths
            grid = Grid(valid_bt, lengths_b, None, jnp.arange(t, dtype=jnp.int32)[None])
        x_btd = self.embeddings(input_ids_bt, token_type_ids_bt, dtype, positions_bt if packed else None)
        keys = None
        if dropout_key is not None:
            base = dropout_key
            if base.ndim == 0:  # one key for the batch: derive row keys 0..B-1
                base = row_keys(base, jnp.arange(b))
            keys = TokenKeys.from_keys(base[:, None] if base.ndim == 1 else base, grid.positions)
        x_btd = _dropout(x_btd, cfg.hidden_dropout_prob, keys, dropout.EMBED_SITE)
        x_btd = scan_layers(self.layers, x_btd, grid, keys, cfg.remat)
        out = {"last_hidden_state": x_btd}
        if not packed:
            dense = (self.dense.kernel[...], self.dense.bias[...]) if cfg.dense_out_features else None
            out["embeddings"] = sentence_head(cfg, pool(x_btd, grid.valid, cfg.pooling, False), dense,
                                              cfg.normalize)
            if with_pooler and cfg.add_pooler:
                out["pooler_output"] = jnp.tanh(self.pooler(x_btd[:, 0]).astype(jnp.float32))
        return out


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


def encode(cfg: ModelConfig, params: Params, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None,
           token_type_ids_bt: jax.Array | None = None, dropout_key: jax.Array | None = None,
           with_pooler: bool = False, positions_bt: jax.Array | None = None,
           segments_bt: jax.Array | None = None) -> dict[str, jax.Array]:
    """Pure forward pass: params (nested dict) + token ids -> {"last_hidden_state", "embeddings", ...}.

    `dropout_key=None` is inference (deterministic). A key turns every dropout site on: either one key
    (rows get fold_in(key, row)) or a [B] array of per-row keys (see `row_keys`), so that a row's masks do
    not depend on which batch or chunk it is encoded in. Packed rows: `segments_bt` and `positions_bt`
    instead of the mask (and [B, T] keys, each token's text's row key); only "last_hidden_state" is
    returned (`encode_packed` pools per text).
    """
    model = _merge(cfg, params)
    return model(input_ids_bt, attention_mask_bt, token_type_ids_bt, dropout_key, with_pooler, positions_bt,
                 segments_bt)


def encode_packed(cfg: ModelConfig, params: Params, input_ids_nrl: jax.Array, positions_nrl: jax.Array,
                  segments_nrl: jax.Array, num_slots: int, dropout_keys_nrl: jax.Array | None = None,
                  normalize: bool | None = None) -> jax.Array:
    """Embeddings [n, num_slots, E] (float32; E = cfg.embedding_dim) of n blocks of R packed rows of L tokens.

    Block i holds texts in slots 0..num_slots-1: the tokens of slot j carry segment id j + 1 and their
    positions in the text (0 = [CLS]); 0 marks padding. `dropout_keys_nrl` (None = inference) is the row
    key of each token's text (`row_keys` of its global row), so each token draws the masks it draws in
    the padded layout. `normalize` None follows `cfg.normalize`.
    """
    n, r, l = input_ids_nrl.shape
    flat = lambda x: None if x is None else x.reshape(n * r, l)  # noqa: E731
    h = encode(cfg, params, flat(input_ids_nrl), None, None, flat(dropout_keys_nrl), positions_bt=flat(positions_nrl),
               segments_bt=flat(segments_nrl))["last_hidden_state"]
    e = pool_segments(h.reshape(n, r * l, -1), segments_nrl.reshape(n, r * l), positions_nrl.reshape(n, r * l),
                      num_slots, cfg.pooling, False)
    return sentence_head(cfg, e, dense_of(cfg, params), cfg.normalize if normalize is None else normalize)


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

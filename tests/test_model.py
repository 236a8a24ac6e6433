"""Flax encoder vs transformers.BertModel (independent reference) on tiny random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from piccolo_jax.config.model import PICCOLO_BASE_ZH, ModelConfig  # noqa: E402
from piccolo_jax.hf import hf_to_params, params_to_hf  # noqa: E402
from piccolo_jax.model.bert import abstract_model, encode, init_params  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=112,
            max_position_embeddings=40, type_vocab_size=2)


def _torch_bert(seed=0, **over):
    torch.manual_seed(seed)
    hf_cfg = transformers.BertConfig(**{**TINY, **over}, hidden_act="gelu", attn_implementation="eager")
    model = transformers.BertModel(hf_cfg).eval()
    # Randomise LayerNorm / biases too, so a swapped or missing tensor cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return hf_cfg, model


def _batch(rng, b=4, t=23, vocab=97):
    ids = rng.integers(1, vocab, size=(b, t)).astype(np.int32)
    lengths = np.array([t, 1, 7, 15][:b])
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)
    types = (rng.random((b, t)) < 0.3).astype(np.int32) * mask
    return ids, mask, types


def _ours(hf_cfg, model, **over):
    cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict(), **over)
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params, _ = hf_to_params(tensors, cfg)
    return cfg, params


def _torch_mean_pool(h, mask):
    m = mask[..., None].float()
    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


def test_matches_transformers_bert_model():
    hf_cfg, model = _torch_bert()
    ids, mask, types = _batch(np.random.default_rng(0))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types, dtype=torch.long))
    cfg, params = _ours(hf_cfg, model)
    out = jax.jit(lambda p, i, m, t: encode(cfg, p, i, m, t, with_pooler=True))(params, ids, mask, types)
    h_ref = ref.last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(out["last_hidden_state"]), h_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out["pooler_output"]), ref.pooler_output.numpy(), atol=1e-5, rtol=0)
    e_ref = _torch_mean_pool(ref.last_hidden_state, torch.tensor(mask)).numpy()
    np.testing.assert_allclose(np.asarray(out["embeddings"]), e_ref, atol=1e-5, rtol=0)
    assert np.allclose(np.linalg.norm(np.asarray(out["embeddings"]), axis=-1), 1.0, atol=1e-6)


def test_cls_pooling_and_default_token_types():
    hf_cfg, model = _torch_bert(seed=1)
    ids, mask, _ = _batch(np.random.default_rng(1))
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
    cfg, params = _ours(hf_cfg, model, pooling="cls", normalize=False)
    out = encode(cfg, params, ids, mask)
    np.testing.assert_allclose(np.asarray(out["embeddings"]), h[:, 0].numpy(), atol=1e-5, rtol=0)


def test_bfloat16_compute_close_to_float32():
    hf_cfg, model = _torch_bert(seed=2)
    ids, mask, _ = _batch(np.random.default_rng(2))
    cfg, params = _ours(hf_cfg, model)
    e32 = np.asarray(encode(cfg, params, ids, mask)["embeddings"])
    out16 = encode(cfg.replace(compute_dtype="bfloat16"), params, ids, mask)
    assert out16["last_hidden_state"].dtype == jnp.bfloat16
    assert out16["embeddings"].dtype == jnp.float32  # pooling always in float32
    cos = np.sum(e32 * np.asarray(out16["embeddings"]), axis=-1)
    assert cos.min() >= 0.999, cos


def test_dropout_key_determinism_and_remat_gradients():
    cfg = ModelConfig(**TINY)
    params = init_params(cfg, jax.random.key(0))
    ids, mask, _ = _batch(np.random.default_rng(3))

    def loss(p, key, c):
        return jnp.sum(encode(c, p, ids, mask, dropout_key=key)["embeddings"] ** 3)

    k = jax.random.key(7)
    a, b = loss(params, k, cfg), loss(params, k, cfg)
    assert a == b  # same key, same masks
    assert loss(params, jax.random.key(8), cfg) != a  # dropout is really on
    assert loss(params, None, cfg) != a
    g = jax.grad(loss)(params, k, cfg)
    for policy in ("full", "dots_saveable", "dots_with_no_batch_dims_saveable"):
        g_remat = jax.grad(loss)(params, k, cfg.replace(remat=policy))
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7, err_msg=policy)


def _np_mix(x):
    """triple32 in numpy uint32 (wrapping), as documented in piccolo_jax.model.dropout."""
    x = np.asarray(x, np.uint32)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint32(17))) * np.uint32(0xED5AD4BB)
        x = (x ^ (x >> np.uint32(11))) * np.uint32(0xAC4C1B51)
        x = (x ^ (x >> np.uint32(15))) * np.uint32(0x31848BAB)
    return x ^ (x >> np.uint32(14))


def _np_join(seed, value):
    with np.errstate(over="ignore"):
        return _np_mix(np.asarray(seed, np.uint32) ^ (np.asarray(value).astype(np.uint32) * np.uint32(0x9E3779B9)))


def _np_seed(key_data):  # [..., words] -> [...]
    seed = _np_mix(key_data[..., 0])
    for i in range(1, key_data.shape[-1]):
        seed = _np_join(seed, key_data[..., i])
    return seed


def _np_keep(seeds, counter, p):
    return _np_join(seeds, counter) < np.uint32(round(p * 2 ** 32))


def _reference_with_dropout(cfg, params, ids, mask, key):
    """BERT with dropout written out per layer (unrolled, jax.nn.gelu), its masks computed in numpy from the
    definition in piccolo_jax.model.dropout: row r -> jax.random.fold_in(key, r), its seed; embeddings
    join(seed, 1_000_000), layer i join(seed, i), then sites 0 (attention probabilities), 1 (attention output),
    2 (FFN output); then the token's position t. A hidden element d is kept when join(token seed, d) < p 2^32,
    attention element [n, s] when join(token seed, n M + s) < p 2^32, M = max_position_embeddings."""
    rate_h, rate_a = cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob
    rows = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(ids.shape[0]))
    row_seeds = _np_seed(np.asarray(jax.random.key_data(rows)))  # [B]
    t_len = ids.shape[1]

    def token_seeds(seeds):  # [B] -> [B, T]
        return _np_join(seeds[:, None], np.arange(t_len)[None])

    def drop(x, rate, seeds):  # x [B, T, D]
        keep = _np_keep(token_seeds(seeds)[..., None], np.arange(x.shape[-1]), 1 - rate)
        return jnp.where(keep, x / (1 - rate), 0)

    def drop_probs(p, rate, seeds):  # p [B, N, T, S]
        n, m, s = p.shape[1], cfg.max_position_embeddings, p.shape[-1]
        counter = np.arange(n)[:, None, None] * m + np.arange(s)[None, None, :]  # [N, 1, S]
        keep = _np_keep(token_seeds(seeds)[:, None, :, None], counter[None], 1 - rate)  # [B, N, T, S]
        return jnp.where(keep, p / (1 - rate), 0)

    def fold(seeds, i):
        return _np_join(seeds, i)

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + cfg.layer_norm_eps) * p["scale"] + p["bias"]

    e = params["embeddings"]
    t = ids.shape[1]
    x = e["word"]["embedding"][ids] + e["position"]["embedding"][:t] + e["token_type"]["embedding"][0]
    x = drop(ln(x, e["norm"]), rate_h, fold(row_seeds, 1_000_000))
    n, h = cfg.num_attention_heads, cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        lp = jax.tree.map(lambda a: a[i], params["layers"])
        keys = fold(row_seeds, i)
        dense = lambda y, p: y @ p["kernel"] + p["bias"]  # noqa: E731
        heads = lambda y: y.reshape(*y.shape[:2], n, h)  # noqa: E731
        at = lp["attention"]
        q, k_, v = heads(dense(x, at["query"])), heads(dense(x, at["key"])), heads(dense(x, at["value"]))
        s = jnp.einsum("bqnh,bknh->bnqk", q, k_) / np.sqrt(h) + jnp.where(mask[:, None, None, :] > 0, 0, -1e30)
        probs = drop_probs(jax.nn.softmax(s, axis=-1), rate_a, fold(keys, 0))
        o = jnp.einsum("bnqk,bknh->bqnh", probs, v).reshape(x.shape)
        x = ln(x + drop(dense(o, at["output"]), rate_h, fold(keys, 1)), lp["attention_norm"])
        f = dense(jax.nn.gelu(dense(x, lp["ffn_in"]), approximate=False), lp["ffn_out"])
        x = ln(x + drop(f, rate_h, fold(keys, 2)), lp["ffn_norm"])
    return x


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_draw_the_documented_dropout_masks(remat):
    """Same outputs as an unrolled per-layer reference whose masks are computed in numpy from the documented definition."""
    cfg = ModelConfig(**TINY, remat=remat)
    params = init_params(cfg, jax.random.key(1))
    ids, mask, _ = _batch(np.random.default_rng(5))
    key = jax.random.key(11)
    ours = jax.jit(lambda p: encode(cfg, p, ids, mask, dropout_key=key)["last_hidden_state"])(params)
    ref = _reference_with_dropout(cfg, params, jnp.asarray(ids), jnp.asarray(mask), key)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=0)
    no_dropout = encode(cfg, params, ids, mask)["last_hidden_state"]
    assert np.abs(np.asarray(no_dropout) - np.asarray(ref)).max() > 0.1  # the masks matter


def test_remat_policy_names_and_legacy_booleans():
    assert ModelConfig(**TINY, remat=True).remat == "full"
    assert ModelConfig(**TINY, remat=False).remat == "none"
    assert ModelConfig(**TINY).replace(remat="dots_saveable").remat == "dots_saveable"
    with pytest.raises(ValueError, match="remat='everything'"):
        ModelConfig(**TINY, remat="everything")
    with pytest.raises(ValueError, match="attention='flash'"):
        ModelConfig(**TINY, attention="flash")
    assert "remat" not in ModelConfig(**TINY).to_hf_dict() and "attention" not in ModelConfig(**TINY).to_hf_dict()


def test_shipped_configs_with_remat_true_read_as_full():
    from piccolo_jax.config import load_config
    from piccolo_jax.io.resources import find_config

    for recipe in ("pretrain", "finetune"):
        assert load_config(find_config(recipe), recipe).model.remat == "full"


def test_every_parameter_has_logical_axes_and_presets_have_piccolo_shapes():
    _, abstract, logical = abstract_model(PICCOLO_BASE_ZH)
    shapes, names = jax.tree.leaves(abstract), jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, tuple))
    assert len(shapes) == len(names)
    for s, n in zip(shapes, names):
        assert len(n) == len(s.shape) and all(isinstance(a, str) for a in n)
    layer_names = jax.tree.leaves(logical["layers"], is_leaf=lambda x: isinstance(x, tuple))
    assert len(layer_names) == 16 and all(n[0] == "layers" for n in layer_names)  # stacked: [L, ...]
    assert all(s.shape[0] == 12 for s in jax.tree.leaves(abstract["layers"]))
    assert abstract["layers"]["ffn_in"]["kernel"].shape == (12, 768, 3072)
    n_params = sum(int(np.prod(s.shape)) for s in shapes)
    assert 101_000_000 < n_params < 103_000_000  # piccolo-base-zh: ~102 M
    assert abstract["embeddings"]["word"]["embedding"].shape == (21128, 768)


def test_params_to_hf_inverts_hf_to_params():
    hf_cfg, model = _torch_bert(seed=4)
    cfg, params = _ours(hf_cfg, model)
    back = params_to_hf(params, cfg)
    ref = model.state_dict()
    assert set(back) == set(ref)
    for k, v in back.items():
        assert np.array_equal(v, ref[k].numpy()), k


def test_layers_axis_is_never_sharded():
    from piccolo_jax.config.mesh import STRATEGIES
    from piccolo_jax.parallel import sharding

    _, abstract, logical = abstract_model(ModelConfig(**{**TINY, "num_hidden_layers": 8}))
    mesh = jax.make_mesh((1, 4, 2), sharding.MESH_AXES, devices=jax.devices()[:8])
    for strategy in STRATEGIES:
        specs = sharding.param_specs(abstract, logical, mesh, strategy)
        for spec in jax.tree.leaves(specs["layers"], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
            assert len(spec) == 0 or spec[0] is None, (strategy, spec)  # 8 layers would divide fsdp=4
    assert sharding.LOGICAL_RULES["fsdp"]["layers"] is None


def test_stack_layers_reads_trees_saved_before_stacking():
    from piccolo_jax.model.bert import stack_layers

    cfg = ModelConfig(**TINY)
    params = init_params(cfg, jax.random.key(2))
    old = {**params, "layers": {str(i): jax.tree.map(lambda a: a[i], params["layers"]) for i in range(2)}}
    back = stack_layers(old)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert stack_layers(params) is params
    with pytest.raises(ValueError, match="not 0 .. 1"):
        stack_layers({"layers": {0: old["layers"]["0"], 2: old["layers"]["1"]}})


def test_config_mismatch_is_refused():
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf_dict({**TINY, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(**{**TINY, "num_attention_heads": 5})


def test_dropout_masks_equal_the_documented_hash():
    from piccolo_jax.model import dropout

    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(3), jnp.arange(5))
    assert np.array_equal(np.asarray(jax.random.key_data(dropout.row_keys(jax.random.key(3), jnp.arange(5)))),
                          np.asarray(jax.random.key_data(keys)))
    seeds = np.asarray(dropout.key_seed(keys))
    assert np.array_equal(seeds, _np_seed(np.asarray(jax.random.key_data(keys))))
    tokens = dropout.TokenKeys.from_keys(keys[:, None], jnp.arange(6)[None]).at(4, 2)  # [5, 6] token seeds
    ref_tokens = _np_join(_np_join(_np_join(seeds, 4), 2)[:, None], np.arange(6)[None])
    assert np.array_equal(np.asarray(tokens), ref_tokens)
    for width, p in ((7, 0.9), (33, 0.5), (256, 0.1)):
        ours = dropout.keep_hidden(tokens, p, width)
        ref = _np_keep(ref_tokens[..., None], np.arange(width), p)
        assert ours.shape == ref.shape and np.array_equal(np.asarray(ours), ref), width
    positions = np.asarray([[4, 0, 2, 9], [1, 1, 3, 0], [0, 5, 6, 7], [2, 2, 2, 2], [9, 8, 7, 6]])
    ours = dropout.keep_attention(tokens, jnp.asarray(positions), 0.3, 3, 10)  # [5, 3 heads, 6, 4]
    counter = np.arange(3)[None, :, None, None] * 10 + positions[:, None, None, :]  # [5, 3, 1, 4]
    ref = _np_keep(ref_tokens[:, None, :, None], counter, 0.3)
    assert ours.shape == ref.shape == (5, 3, 6, 4) and np.array_equal(np.asarray(ours), ref)


def test_dropout_masks_keep_p_and_are_independent():
    """The hash's masks behave as independent Bernoulli(p) draws: the keep rate, and the correlation of
    neighbouring elements, tokens, rows, layers, sites and steps, each within 5 sigma of a fair draw."""
    from piccolo_jax.model import dropout

    b, t, d, p = 64, 64, 128, 0.9

    def masks(step, layer, site):
        rows = dropout.row_keys(jax.random.key(step), jnp.arange(b))
        seeds = dropout.TokenKeys.from_keys(rows[:, None], jnp.arange(t)[None]).at(layer, site)
        return np.asarray(dropout.keep_hidden(seeds, p, d), np.float64)  # [B, T, D]

    m = masks(0, 0, 1)
    n = m.size
    assert abs(m.mean() - p) < 5 * np.sqrt(p * (1 - p) / n), m.mean()

    def corr(x, y):
        x, y = x.ravel() - x.mean(), y.ravel() - y.mean()
        return float(x @ y / np.sqrt((x @ x) * (y @ y)))

    pairs = {"element": (m[..., 1:], m[..., :-1]), "token": (m[:, 1:], m[:, :-1]), "row": (m[1:], m[:-1]),
             "layer": (m, masks(0, 1, 1)), "site": (m, masks(0, 0, 2)), "step": (m, masks(1, 0, 1))}
    for name, (x, y) in pairs.items():
        assert abs(corr(x, y)) < 5 / np.sqrt(x.size), (name, corr(x, y))  # null sd of a correlation: 1/sqrt(n)
    seeds = dropout.TokenKeys.from_keys(dropout.row_keys(jax.random.key(0), jnp.arange(8))[:, None],
                                        jnp.arange(64)[None]).at(0, 0)
    heads = np.asarray(dropout.keep_attention(seeds, jnp.broadcast_to(jnp.arange(64), (8, 64)), p, 4, 512),
                       np.float64)  # [8, 4, 64, 64]
    assert abs(heads.mean() - p) < 5 * np.sqrt(p * (1 - p) / heads.size)
    for x, y in ((heads[:, 1:], heads[:, :-1]), (heads[..., 1:], heads[..., :-1])):  # heads, key positions
        assert abs(corr(x, y)) < 5 / np.sqrt(x.size)

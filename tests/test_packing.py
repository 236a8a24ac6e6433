"""Packed sequences: host packing, the packed encoder against transformers.BertModel per text, dropout masks
that do not move when texts are packed, and the packed train step against the independent single-device
reference of test_train_step on 8 simulated devices (meshes, strategies, gradient-caching chunks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import pack_padded

from piccolo_jax.config.model import ModelConfig
from piccolo_jax.data import packing
from piccolo_jax.model import attention
from piccolo_jax.model.bert import encode, encode_packed, init_params, row_keys

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")


def unpack(ids, positions, segments) -> dict[int, list[int]]:
    """{slot: token ids} of one packed block, read back from its three arrays (order by position)."""
    out: dict[int, list] = {}
    for r, u in zip(*np.nonzero(segments)):
        out.setdefault(int(segments[r, u]) - 1, []).append((int(positions[r, u]), int(ids[r, u])))
    return {s: [t for _, t in sorted(v)] for s, v in out.items()}


# ------------------------------------------------------------------------------------------- host packing
def test_first_fit_hand_example():
    # capacity 10, longest first: 6 -> row 0; 5 -> row 1; 4 -> row 0 (full); 3 -> row 1; 2 -> row 1 (full)
    used, rows, offsets = packing.first_fit(np.array([[3, 6, 2, 5, 4, 0]]), 10)
    assert used.tolist() == [2]
    assert rows.tolist() == [[1, 0, 1, 1, 0, -1]] and offsets.tolist() == [[5, 0, 8, 0, 6, -1]]


def test_first_fit_properties():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 33, size=(50, 40))
    used, rows, offsets = packing.first_fit(lengths, 32)
    for j in range(50):
        cover = np.zeros((40, 32), int)
        for i in range(40):
            if lengths[j, i]:
                assert 0 <= rows[j, i] < used[j] and offsets[j, i] + lengths[j, i] <= 32
                cover[rows[j, i], offsets[j, i]:offsets[j, i] + lengths[j, i]] += 1
            else:
                assert rows[j, i] == -1
        assert cover.max() <= 1 and cover.sum() == lengths[j].sum()  # no overlap, nothing dropped
        total = lengths[j].sum()
        assert -(-total // 32) <= used[j] <= 11 / 9 * -(-total // 32) + 1  # FFD's bound against the lower bound


def test_pack_side_uses_the_bounds_layout_when_first_fit_needs_more_rows():
    # first fit of [4, 4, 3, 3, 3, 3] into rows of 10 needs 3 rows ([4 4] [3 3 3] [3]); [4 3 3] [4 3 3] fits 2
    texts = [[i + 1] * n for i, n in enumerate([4, 4, 3, 3, 3, 3])]
    layout_rows, layout_offsets = np.array([0, 1, 0, 0, 1, 1]), np.array([0, 0, 4, 7, 4, 7])
    arrays, real = packing.pack_side(texts, layout_rows, layout_offsets, 2, 10, pad_id=0)
    assert real == 20 and arrays["input_ids"].shape == (2, 10)
    assert unpack(arrays["input_ids"], arrays["positions"], arrays["segments"]) == dict(enumerate(texts))
    with pytest.raises(AssertionError, match="outside"):
        packing.pack_side(texts, np.zeros(6, int), np.zeros(6, int) + 8, 2, 10, pad_id=0)


def test_pack_padded_round_trips_every_text():
    from test_train_step import make_batch

    batch = make_batch(True)
    packed = pack_padded(batch, shards=4, num_chunks=2)
    b, k = 64, 2
    m = b // 8
    for side, l in (("query", 8), ("document", 12)):
        ids = packed[f"packed_{side}_input_ids"].reshape(8, -1, l)
        pos, seg = (packed[f"packed_{side}_{f}"].reshape(8, -1, l) for f in ("positions", "segments"))
        for j in range(8):
            got = unpack(ids[j], pos[j], seg[j])
            rows = range(j * m, (j + 1) * m)
            if side == "query":
                want = [batch["query_input_ids"][r][:batch["query_attention_mask"][r].sum()].tolist() for r in rows]
            else:
                want = [batch["passage_input_ids"][r][:batch["passage_attention_mask"][r].sum()].tolist() for r in rows]
                want += [batch["negative_input_ids"][r, i][:batch["negative_attention_mask"][r, i].sum()].tolist()
                         for r in rows for i in range(k)]
            assert got == dict(enumerate(want)), (side, j)
    assert packed["packed_document_lengths"].shape == (b, 1 + k)
    # several texts share a row: the point of packing
    seg = packed["packed_document_segments"]
    assert max(len(set(row[row > 0])) for row in seg) >= 2


# ---------------------------------------------------------------------------------------------- encoder
TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=112,
            max_position_embeddings=40, type_vocab_size=2)
LENGTHS = [23, 1, 7, 15, 2, 30, 9, 4, 12, 3, 18, 6]  # 12 texts; two blocks of six


def _texts(rng, lengths=LENGTHS, vocab=97):
    return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


def _pack_blocks(texts, blocks, length):
    """[blocks, R, L] arrays of texts split into equal blocks (slot order), by first fit of real lengths."""
    m = len(texts) // blocks
    lengths = np.array([len(t) for t in texts]).reshape(blocks, m)
    used, rows, offsets = packing.first_fit(lengths, length)
    r = int(used.max()) + 1  # one spare row: padding rows must not matter
    out = [packing.pack_side(texts[j * m:(j + 1) * m], rows[j], offsets[j], r, length, 0)[0] for j in range(blocks)]
    return tuple(np.stack([o[f] for o in out]) for f in ("input_ids", "positions", "segments"))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_embeddings_equal_bert_model_per_text(pooling):
    torch = pytest.importorskip("torch")
    from test_model import _ours, _torch_bert

    hf_cfg, model = _torch_bert(seed=3)
    cfg, params = _ours(hf_cfg, model, pooling=pooling)
    texts = _texts(np.random.default_rng(0))
    ids, pos, seg = _pack_blocks(texts, 2, 32)
    assert ids.shape[1] < len(texts) // 2  # rows hold several texts
    got = np.asarray(jax.jit(lambda p: encode_packed(cfg, p, ids, pos, seg, 6))(params)).reshape(12, -1)
    with torch.no_grad():  # each text alone, unpadded
        ref = []
        for t in texts:
            h = model(input_ids=torch.tensor([t])).last_hidden_state[0]
            e = h.mean(0) if pooling == "mean" else h[0]
            ref.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    np.testing.assert_allclose(got, np.stack(ref), atol=1e-5, rtol=0)


def test_packed_hidden_states_with_dropout_equal_padded_ones():
    """Dropout on at every site: each real token's hidden state is the padded row's, so every mask bit is
    the same (one flipped bit would move that token by O(1)); embeddings equal to 1e-5."""
    cfg = ModelConfig(**TINY)
    params = init_params(cfg, jax.random.key(1))
    texts = _texts(np.random.default_rng(1))
    t = max(map(len, texts))
    ids_bt = np.array([x + [0] * (t - len(x)) for x in texts], np.int32)
    mask_bt = (ids_bt > 0).astype(np.int32)
    key = jax.random.key(5)
    keys_b = row_keys(key, jnp.arange(12) + 100)  # global rows 100..111
    padded = jax.jit(lambda p: encode(cfg, p, ids_bt, mask_bt, dropout_key=keys_b))(params)
    ids, pos, seg = _pack_blocks(texts, 2, 32)
    slot_rows = np.where(seg > 0, (seg - 1) + 6 * np.arange(2)[:, None, None] + 100, 0)
    tok_keys = row_keys(key, jnp.asarray(slot_rows))
    flat = lambda x: x.reshape(-1, 32)  # noqa: E731
    h = jax.jit(lambda p: encode(cfg, p, flat(ids), None, None, flat(tok_keys), positions_bt=flat(pos),
                                 segments_bt=flat(seg))["last_hidden_state"])(params)
    h, h_pad = np.asarray(h).reshape(2, -1, 32, 64), np.asarray(padded["last_hidden_state"])
    for j, r, u in zip(*np.nonzero(seg)):
        text = 6 * j + seg[j, r, u] - 1
        np.testing.assert_allclose(h[j, r, u], h_pad[text, pos[j, r, u]], atol=1e-5, rtol=0)
    emb = jax.jit(lambda p: encode_packed(cfg, p, ids, pos, seg, 6, tok_keys))(params)
    np.testing.assert_allclose(np.asarray(emb).reshape(12, -1), np.asarray(padded["embeddings"]), atol=1e-5, rtol=0)
    no_dropout = np.asarray(encode(cfg, params, ids_bt, mask_bt)["embeddings"])
    assert np.abs(no_dropout - np.asarray(padded["embeddings"])).max() > 1e-2  # the masks matter


def test_splash_attention_with_segment_ids_equals_explicit_in_interpret_mode():
    """The TPU kernel (Pallas interpret mode on CPU) against the explicit path: outputs at real tokens and
    the gradients of a loss over them, packed rows of 128 tokens."""
    rng = np.random.default_rng(2)
    b, t, n, h = 2, attention.SPLASH_BLOCK, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in range(3))
    seg = np.zeros((b, t), np.int32)
    seg[0, :50], seg[0, 50:90], seg[0, 90:120] = 1, 2, 3
    seg[1, :128] = np.repeat([1, 2, 3, 4], 32)
    seg = jnp.asarray(seg)
    real = (seg > 0)[:, :, None, None]

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)

    splash = lambda q, k, v: attention.splash_attention(q, k, v, seg, interpret=True)  # noqa: E731
    explicit = lambda q, k, v: attention.explicit_attention(q, k, v, seg > 0, None, seg)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jnp.where(real, splash(q, k, v), 0)),
                               np.asarray(jnp.where(real, explicit(q, k, v), 0)), atol=2e-5, rtol=0)
    g_s = jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2))(q, k, v)
    g_e = jax.grad(lambda *a: loss(explicit, *a), argnums=(0, 1, 2))(q, k, v)
    for a, e in zip(g_s, g_e):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=2e-4 * float(jnp.abs(e).max()), rtol=0)


def test_packed_encoder_lowers_for_tpu_with_splash_and_describes_its_path(monkeypatch):
    cfg = ModelConfig(**{**TINY, "max_position_embeddings": 256}, compute_dtype="bfloat16")
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "tpu")
    assert attention.attention_path(cfg, training=False, packed=True, seq_len=128) == "splash"
    assert attention.attention_path(cfg, training=False, packed=True, seq_len=64) == "explicit"
    assert attention.attention_path(cfg, training=True, packed=True, seq_len=128) == "explicit"  # probs dropout
    assert "splash attention with segment ids" in attention.describe_attention(cfg, training=False, packed=True)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    x = jax.ShapeDtypeStruct((2, 3, 128), jnp.int32)
    fn = jax.jit(lambda p, i, ps, s: encode_packed(cfg, p, i, ps, s, 8))
    exported = jax.export.export(fn, platforms=("tpu",))(params, x, x, x)
    assert "tpu_custom_call" in exported.mlir_module()  # the Pallas kernel
    monkeypatch.undo()
    line = attention.describe_attention(cfg.replace(compute_dtype="float32"), training=True, packed=True)
    assert "segment-mask" in line and "packed" in line


def test_fused_packed_attention_hands_cudnn_a_segment_mask(monkeypatch):
    """What the cuDNN path receives for packed rows (recorded, run through XLA): a boolean [B, 1, T, T]
    block-diagonal mask and no sequence lengths; its outputs equal the explicit path at real tokens."""
    calls = []
    original = jax.nn.dot_product_attention

    def record(query, key, value, bias=None, mask=None, **kw):
        calls.append(dict(mask=mask, **kw))
        kw["implementation"] = "xla"
        return original(query, key, value, bias, mask, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    fused = ModelConfig(**TINY, compute_dtype="bfloat16", attention="cudnn", attention_probs_dropout_prob=0.0)
    params = init_params(fused, jax.random.key(0))
    ids, pos, seg = _pack_blocks(_texts(np.random.default_rng(3)), 2, 32)
    got = encode_packed(fused, params, ids, pos, seg, 6)
    c = calls[0]
    assert c["implementation"] == "cudnn" and c.get("query_seq_lengths") is None
    assert c["mask"].dtype == jnp.bool_ and c["mask"].shape == (ids.shape[0] * ids.shape[1], 1, 32, 32)
    ref = encode_packed(fused.replace(attention="explicit"), params, ids, pos, seg, 6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-2)


# ------------------------------------------------------------------------------------------- train step
# (data, fsdp, tensor), strategy, loss, gradient-caching chunks: meshes (8,), (4, 2), (2, 4) (the last with
# tensor parallelism), each strategy, each loss, 1 / 2 / 4 chunks; dropout on everywhere.
PACKED_CONFIGS = [
    ((8, 1, 1), "dp", "in_batch", 1),
    ((8, 1, 1), "zero1", "gte", 4),
    ((4, 2, 1), "fsdp", "gte", 2),
    ((4, 2, 1), "zero1", "hard_negative", 1),
    ((2, 1, 4), "zero1", "in_batch", 2),
    ((2, 1, 4), "dp", "hard_negative", 4),
]


@pytest.mark.parametrize("mesh_shape,strategy,kind,num_chunks", PACKED_CONFIGS,
                         ids=[f"{'x'.join(map(str, m))}-{s}-{k}-{c}chunks" for m, s, k, c in PACKED_CONFIGS])
def test_packed_step_matches_single_device_reference(mesh_shape, strategy, kind, num_chunks):
    """The packed train step's loss, grad norm, gradient (Adam mu) and updated parameters equal the padded
    single-device reference of test_train_step (which today's padded step equals on every mesh)."""
    import test_train_step as tts

    from piccolo_jax.parallel.sharding import host_local_to_global

    mesh, optimizer, step, _ = tts.step_setup(mesh_shape, strategy, kind, num_chunks)
    shards = mesh_shape[0] * mesh_shape[1]
    # rows of twice the padded lengths (positions stay those of each text): several texts per row
    packed = pack_padded(tts.make_batch(kind != "in_batch"), shards, num_chunks,
                                 lengths=(2 * tts.TQ, 2 * tts.TP))
    for side in ("query", "document"):  # texts share rows on both sides
        assert max(len(set(r[r > 0])) for r in packed[f"packed_{side}_segments"]) >= 2, side
    batch = host_local_to_global(packing.step_arrays(packed), mesh)
    state = tts.create_train_state(tts.CFG, optimizer, mesh, strategy, jax.random.key(0), params=tts.host_params())
    new_state, metrics = step.lower(state, batch, tts.STEP_KEY).compile(tts.FAST)(state, batch, tts.STEP_KEY)
    out = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
           "metric_skipped": int(metrics["skipped"]), "step": int(new_state.step), "skipped": int(new_state.skipped),
           "params": jax.tree.map(np.asarray, new_state.params),
           "mu": jax.tree.map(np.asarray, tts.adam_state(new_state.opt_state).mu)}
    tts.check_against_reference(out, kind)
    tts.check_shardings(mesh_shape, strategy, tts.shardings_of(new_state))


# ---------------------------------------------------------------------------------------------- trainer
def test_trainer_packed_run_reproduces_the_padded_run(tmp_path):
    """Through the CLI (one device, 2 chunks of 16 pairs, dropout on): data.packing (the default) trains the
    same losses as data.packing=false, logs its shapes, attention path and packing efficiency."""
    import json

    from trainer_cli import losses, run

    run(tmp_path / "packed", "run.steps=6")
    run(tmp_path / "padded", "run.steps=6", "data.packing=false")
    packed, padded = losses(tmp_path / "packed"), losses(tmp_path / "padded")
    assert sorted(packed) == sorted(padded) == list(range(1, 7))
    np.testing.assert_allclose([packed[s] for s in range(1, 7)], [padded[s] for s in range(1, 7)], rtol=1e-4)
    log = (tmp_path / "packed" / "train.log").read_text()
    assert "packing: per device and chunk, 16 queries in" in log and "segment-mask bias" in log
    assert "step 6 packing:" in log and "% of the computed tokens are real" in log
    metrics = [json.loads(x) for x in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    efficiency = [m["packing_efficiency"] for m in metrics if "packing_efficiency" in m]
    assert len(efficiency) == 6 and all(0.3 < e <= 1 for e in efficiency)
    assert metrics[-1]["data/packing_fallbacks"] == 0
    padded_log = (tmp_path / "padded" / "train.log").read_text()
    assert "packing:" not in padded_log


# ------------------------------------------------------------------- vectorised host packing vs a loop
def _reference_pack_side(token_ids, bound_rows, bound_offsets, num_rows, length, pad_id):
    """The plain per-text loop: first fit of the real counts if it fits num_rows, else the bounds' layout."""
    lengths = np.array([len(t) for t in token_ids])
    used, rows, offsets = packing.first_fit(lengths[None], length)
    if used[0] > num_rows:
        rows, offsets = bound_rows[None], bound_offsets[None]
    ids = np.full((num_rows, length), pad_id, np.int32)
    positions, segments = np.zeros_like(ids), np.zeros_like(ids)
    for slot, seq in enumerate(token_ids):
        r, o = int(rows[0, slot]), int(offsets[0, slot])
        for u, token in enumerate(seq):
            ids[r, o + u], positions[r, o + u], segments[r, o + u] = token, u, slot + 1
    return {"input_ids": ids, "positions": positions, "segments": segments}, int(lengths.sum())


@pytest.mark.parametrize("k", [0, 3])
def test_pack_host_arrays_equal_the_per_text_loop(k):
    """Blocks whose real first fit needs more rows than R take the bounds' layout (some do here)."""
    from piccolo_jax.text.ragged import Ragged

    rng = np.random.default_rng(k)
    blocks, m, first_block, lq, ld = 6, 6, 2, 10, 24
    b = (blocks - first_block) * m
    # host block 0: first fit of [4 4 3 3 3 3] into rows of 10 needs 3 rows; the bounds' layout below fits 2
    queries = [[5] * n for n in [4, 4, 3, 3, 3, 3]] + [rng.integers(1, 99, rng.integers(2, 4)).tolist()
                                                      for _ in range(b - m)]
    documents = [[rng.integers(1, 99, rng.integers(2, ld + 1)).tolist() for _ in range(1 + k)] for _ in range(b)]
    q_len = np.array([len(q) for q in queries])
    d_len = np.array([[len(t) for t in d] for d in documents])
    bounds_q = np.concatenate([np.full(first_block * m, 3), q_len])
    bounds_d = np.concatenate([np.full((first_block * m, 1 + k), 3),
                               np.minimum(d_len + rng.integers(0, 4, d_len.shape), ld)])
    rq, rows_q, off_q = packing.first_fit(packing.query_blocks(bounds_q, blocks), lq)
    rows_q[first_block], off_q[first_block] = [0, 1, 0, 0, 1, 1], [0, 0, 4, 7, 4, 7]
    rd, rows_d, off_d = packing.first_fit(packing.document_blocks(bounds_d, blocks), ld)
    assert np.delete(rq, first_block).max() <= 2
    spec = packing.PackingSpec(blocks, 1, 2, lq, int(rd.max()), ld)
    layout = {"query": (rows_q, off_q), "document": (rows_d, off_d)}
    got = packing.pack_host_arrays(Ragged.from_lists(queries), Ragged.from_lists([d[0] for d in documents]),
                                   Ragged.from_lists([t for d in documents for t in d[1:]]), spec, first_block,
                                   layout, pad_id=7)
    via_lists = packing.pack_host_batch(queries, documents, spec, first_block, layout, 7)
    assert via_lists["packing"] == got["packing"]
    for key in packing.PACKED_KEYS:
        np.testing.assert_array_equal(got[key], via_lists[key], err_msg=key)
    real = fallbacks = 0
    for side, r, length in (("query", spec.query_rows, lq), ("document", spec.document_rows, ld)):
        for j in range(blocks - first_block):
            rows = documents[j * m:(j + 1) * m]
            block = ([d[0] for d in rows] + [t for d in rows for t in d[1:]] if side == "document"
                     else queries[j * m:(j + 1) * m])
            fallbacks += packing.first_fit(np.array([[len(t) for t in block]]), length)[0][0] > r
            want, n = _reference_pack_side(block, layout[side][0][first_block + j], layout[side][1][first_block + j],
                                           r, length, 7)
            real += n
            for name, arr in want.items():
                np.testing.assert_array_equal(got[f"packed_{side}_{name}"][j * r:(j + 1) * r], arr, err_msg=name)
    assert got["packing"]["real_tokens"] == real == q_len.sum() + d_len.sum()
    assert fallbacks >= 1
    np.testing.assert_array_equal(got["packed_query_lengths"], q_len)
    np.testing.assert_array_equal(got["packed_document_lengths"], d_len)


def test_ragged_take_concat_pad_against_lists():
    from piccolo_jax.text.ragged import Ragged

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 50, rng.integers(0, 6)).tolist() for _ in range(30)]
    r = Ragged.from_lists(rows)
    assert r.values.dtype == np.int32 and len(r) == 30 and r.to_lists() == rows
    index = rng.integers(0, 30, 45)
    assert r.take(index).to_lists() == [rows[i] for i in index]
    assert Ragged.concat([r, r.take(index[:5])]).to_lists() == rows + [rows[i] for i in index[:5]]
    ids, mask = r.padded(6, pad_id=9)
    assert ids.tolist() == [row + [9] * (6 - len(row)) for row in rows]
    assert mask.tolist() == [[1] * len(row) + [0] * (6 - len(row)) for row in rows]
    with pytest.raises(ValueError, match="more than the padded length 4"):
        r.padded(4, 0)

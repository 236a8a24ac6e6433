"""The Dense head after pooling (piccolo v2's scaling layer) against sentence-transformers.

The reference is a tiny random `transformers.BertModel` with sentence-transformers' Pooling and Dense
modules, saved by sentence-transformers itself in piccolo-large-zh-v2's layout (1_Pooling, 2_Dense with a
pytorch_model.bin, modules.json, no Normalize). Checked: import (our embeddings = SentenceTransformer's to
1e-5, padded and packed, one and eight devices), the convert round trip (every tensor bit-exact, the
written directory loads in sentence-transformers), Matryoshka truncation (= truncate_dim), and what is
refused (with the file named).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("sentence_transformers")

from piccolo_jax.commands.convert import main as convert_main  # noqa: E402
from piccolo_jax.hf import ConversionError, load_hf_model, read_hf_tensors, write_hf_dir  # noqa: E402
from piccolo_jax.inference.encoder import Encoder  # noqa: E402
from piccolo_jax.io.resources import bundled_tokenizer  # noqa: E402
from piccolo_jax.model.directory import load_model_dir  # noqa: E402

HIDDEN, OUT = 32, 48
TEXTS = ["北京是中国的首都。", "这款手机的电池续航很好", "mixed 中英文 text 123", "短",
         "今天天气很好，我们去公园散步吧。" * 6]


def _st_dir(root: Path, name: str, normalize: bool = False, activation=None, seed: int = 0) -> Path:
    """A sentence-transformers directory: random tiny BERT -> mean Pooling -> Dense(32 -> 48) [-> Normalize]."""
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    bert_dir = root / f"{name}-bert"
    tokenizer = BertTokenizerFast.from_pretrained(str(bundled_tokenizer()))
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)).save_pretrained(
        str(bert_dir))
    tokenizer.save_pretrained(str(bert_dir))
    dense = Dense(HIDDEN, OUT, bias=True, activation_function=activation or torch.nn.Identity())
    with torch.no_grad():
        dense.linear.bias.normal_(0, 0.5)  # a visible bias (its default init is small)
    modules = [Transformer(str(bert_dir), max_seq_length=128), Pooling(HIDDEN, "mean"), dense]
    if normalize:
        modules.append(Normalize())
    model = st.SentenceTransformer(modules=modules, device="cpu")
    model.save(str(root / name), safe_serialization=False)  # piccolo v2's save: 2_Dense/pytorch_model.bin
    return root / name


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory):
    return _st_dir(tmp_path_factory.mktemp("dense"), "v2")


def _st_encode(path, texts, **kwargs):
    return st.SentenceTransformer(str(path), device="cpu", **kwargs).encode(texts, convert_to_numpy=True)


def test_the_reference_has_piccolo_v2s_layout(v2_dir):
    kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((v2_dir / "modules.json").read_text())]
    assert kinds == ["Transformer", "Pooling", "Dense"]
    assert (v2_dir / "2_Dense" / "pytorch_model.bin").is_file() and (v2_dir / "1_Pooling").is_dir()


@pytest.mark.parametrize("packing", [True, False])
def test_import_matches_sentence_transformers(v2_dir, packing):
    cfg, params, _ = load_hf_model(v2_dir)
    assert (cfg.dense_out_features, cfg.normalize, cfg.embedding_dim) == (OUT, False, OUT)
    assert params["dense"]["kernel"].shape == (HIDDEN, OUT)
    enc = Encoder.load(v2_dir)
    enc.packing = packing
    # no Normalize module: sentence-transformers returns the Dense output; Encoder.encode normalises unless told
    ours, ref = enc.encode(TEXTS, normalize=False), _st_encode(v2_dir, TEXTS)
    assert ours.shape == ref.shape == (len(TEXTS), OUT) and enc.dim == OUT
    assert np.abs(ref).max() > 0.5  # the bias is visible
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    unit = st.SentenceTransformer(str(v2_dir), device="cpu").encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(enc.encode(TEXTS), unit, atol=1e-5, rtol=0)


def test_one_device_and_fsdp_sharded_dense_agree(v2_dir):
    import jax

    from piccolo_jax.parallel.sharding import MeshConfig, make_mesh

    one = Encoder.load(v2_dir, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    fsdp = Encoder.load(v2_dir, strategy="fsdp")
    assert len(fsdp.params["dense"]["kernel"].sharding.device_set) == 8
    assert not fsdp.params["dense"]["kernel"].sharding.is_fully_replicated  # split on the hidden axis
    np.testing.assert_allclose(one.encode(TEXTS, normalize=False), fsdp.encode(TEXTS, normalize=False), atol=1e-5,
                               rtol=0)


def test_convert_round_trip_is_bit_exact_and_loads_in_sentence_transformers(v2_dir, tmp_path):
    assert convert_main(["hf2jax", str(v2_dir), str(tmp_path / "jax")]) == 0
    cfg, params = load_model_dir(tmp_path / "jax")
    assert cfg.dense_out_features == OUT and "dense" in params
    assert convert_main(["jax2hf", str(tmp_path / "jax"), str(tmp_path / "hf")]) == 0
    src, back = read_hf_tensors(v2_dir), read_hf_tensors(tmp_path / "hf")
    src.pop("embeddings.position_ids", None)
    assert set(src) == set(back)
    for name, value in src.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    from safetensors.numpy import load_file

    dense_src = {k: v.numpy() for k, v in torch.load(v2_dir / "2_Dense" / "pytorch_model.bin").items()}
    dense_back = load_file(str(tmp_path / "hf" / "2_Dense" / "model.safetensors"))
    assert set(dense_back) == set(dense_src) == {"linear.weight", "linear.bias"}
    for name, value in dense_src.items():
        assert dense_back[name].dtype == np.float32 and np.array_equal(dense_back[name], value), name
    kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((tmp_path / "hf" / "modules.json").read_text())]
    assert kinds == ["Transformer", "Pooling", "Dense"]  # no Normalize: the source has none
    np.testing.assert_allclose(_st_encode(tmp_path / "hf", TEXTS), _st_encode(v2_dir, TEXTS), atol=1e-6, rtol=0)


def test_with_normalize_the_export_is_2_dense_then_3_normalize(tmp_path):
    src = _st_dir(tmp_path, "normed", normalize=True, seed=1)
    cfg, params, _ = load_hf_model(src)
    assert cfg.normalize and cfg.dense_out_features == OUT
    out = write_hf_dir(tmp_path / "written", cfg, params, side_files_from=src)
    modules = json.loads((out / "modules.json").read_text())
    assert [(m["path"], m["type"].rsplit(".", 1)[-1]) for m in modules] == [
        ("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense"), ("3_Normalize", "Normalize")]
    assert json.loads((out / "2_Dense" / "config.json").read_text()) == {
        "in_features": HIDDEN, "out_features": OUT, "bias": True,
        "activation_function": "torch.nn.modules.linear.Identity"}
    again_cfg, again, _ = load_hf_model(out)
    assert again_cfg == cfg
    for name in ("kernel", "bias"):
        assert np.array_equal(np.asarray(params["dense"][name]), np.asarray(again["dense"][name])), name
    ref = _st_encode(src, TEXTS)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(Encoder.load(out).encode(TEXTS), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_st_encode(out, TEXTS), ref, atol=1e-6, rtol=0)


def test_matryoshka_truncation_equals_sentence_transformers_truncate_dim(tmp_path):
    src = _st_dir(tmp_path, "normed", normalize=True, seed=2)
    enc = Encoder.load(src)
    for dim in (8, 24, OUT):
        ours = enc.encode(TEXTS, dim=dim)
        ref = st.SentenceTransformer(str(src), device="cpu", truncate_dim=dim).encode(
            TEXTS, normalize_embeddings=True)
        assert ours.shape == (len(TEXTS), dim)
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert enc.encode("短", dim=8).shape == (8,)
    raw = enc.encode(TEXTS, normalize=False, dim=8)
    np.testing.assert_allclose(raw, enc.encode(TEXTS, normalize=False)[:, :8], atol=0, rtol=0)
    for bad in (0, OUT + 1, 2.5, True):
        with pytest.raises(ValueError, match=r"dim=.* must be an int in \[1, 48\]"):
            enc.encode(TEXTS, dim=bad)


def _edit_json(path: Path, **changes):
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def test_unsupported_dense_modules_are_refused_naming_the_file(v2_dir, tmp_path):
    import shutil

    def copy(name):
        shutil.copytree(v2_dir, tmp_path / name)
        return tmp_path / name

    tanh = copy("tanh")
    _edit_json(tanh / "2_Dense" / "config.json", activation_function="torch.nn.modules.activation.Tanh")
    with pytest.raises(ConversionError, match=r"2_Dense/config.json: activation_function .*Tanh"):
        load_hf_model(tanh)
    wide = copy("wide")
    _edit_json(wide / "2_Dense" / "config.json", in_features=64)
    with pytest.raises(ConversionError, match=r"in_features=64, but the encoder's hidden_size is 32"):
        load_hf_model(wide)
    order = copy("order")
    modules = json.loads((order / "modules.json").read_text())
    (order / "modules.json").write_text(json.dumps([modules[0], modules[2], modules[1]]))
    with pytest.raises(ConversionError, match=r"modules.json: modules \['Transformer', 'Dense', 'Pooling'\]"):
        load_hf_model(order)
    with pytest.raises(ConversionError, match=r"has a Dense module 32 -> 48, but dense_out_features=0 was asked "
                                              r"for; set model.dense_out_features=48"):
        load_hf_model(v2_dir, dense_out_features=0)
    missing = copy("missing")
    (missing / "2_Dense" / "pytorch_model.bin").unlink()
    with pytest.raises(ConversionError, match="no model.safetensors or pytorch_model.bin for the Dense module"):
        load_hf_model(missing)


def test_an_encoder_without_a_dense_head_starts_one_at_random(tmp_path):
    """piccolo v2 adds its scaling layer to a pretrained encoder: the Dense head is the random init's, the
    encoder's parameters are the checkpoint's."""
    import jax

    from piccolo_jax.model.bert import init_params
    from piccolo_jax.parallel.sharding import MeshConfig, make_mesh
    from piccolo_jax.training.optim import OptimConfig, make_optimizer
    from piccolo_jax.training.state import create_train_state, missing_subtrees

    plain = tmp_path / "plain"
    st.SentenceTransformer(str(_st_dir(tmp_path, "v2", seed=3) / ""), device="cpu")[0].save(str(plain))
    cfg, params, _ = load_hf_model(plain, dense_out_features=OUT)
    assert cfg.dense_out_features == OUT and "dense" not in params
    assert missing_subtrees(cfg, params) == ("dense",)
    mesh = make_mesh(MeshConfig(data=-1, strategy="zero1"))
    optimizer = make_optimizer(OptimConfig(), total_steps=4)
    key = jax.random.key(5)
    state = create_train_state(cfg, optimizer, mesh, "zero1", key, params=params)
    fresh = jax.jit(init_params, static_argnums=0)(cfg, key)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(state.params["dense"][name]), np.asarray(fresh["dense"][name]))
    np.testing.assert_array_equal(np.asarray(state.params["embeddings"]["word"]["embedding"]),
                                  params["embeddings"]["word"]["embedding"])
    with pytest.raises(ValueError, match=r"unexpected \['head'\], missing \[\]"):
        missing_subtrees(cfg, {**params, "dense": {}, "head": {}})
    with pytest.raises(ValueError, match=r"missing \[.*'embeddings'"):
        missing_subtrees(cfg, {k: v for k, v in params.items() if k != "embeddings"})

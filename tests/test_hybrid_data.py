"""Datasets of the three task types: one task type per dataset, what each task's batches hold, and the
TFDS store's task types and labels (format 4; older formats read as retrieval)."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import bad_record_counts

from piccolo_jax.config import DataConfig
from piccolo_jax.data.batching import positive_slot
from piccolo_jax.data.loader import make_loader
from piccolo_jax.data.records import BadRecord
from piccolo_jax.data.sources import JsonlSource
from piccolo_jax.text.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
HYBRID = ROOT / "assets" / "data" / "hybrid"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(ROOT / "assets" / "tokenizer")


def _write(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _sts(n, tag="s"):
    return [{"text": f"{tag}句子{i}", "text_pair": f"{tag}另一句{i}", "label": i % 6} for i in range(n)]


def _cls(n, negatives=lambda i: ["体育", "财经", "科技"][: 1 + i % 3]):
    return [{"text": f"文本{i}", "text_pos": "娱乐", "text_neg": negatives(i), "type": "cls_contrast"} for i in range(n)]


def _triplets(n, k=lambda i: 2):
    return [{"text": f"问题{i}", "text_pos": f"答案{i}", "text_neg": [f"错{i}-{j}" for j in range(k(i))]}
            for i in range(n)]


def _texts(tokenizer, ids, mask):
    return [tokenizer.backend.decode([int(t) for t in r[:int(m.sum())]], skip_special_tokens=True)
            for r, m in zip(ids, mask)]


# ------------------------------------------------------------------------------------------ one task a dataset
def test_a_dataset_mixing_task_types_is_refused_at_the_first_record_that_disagrees(tmp_path):
    rows = _triplets(3) + _sts(2) + _triplets(2)
    path = _write(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(BadRecord, match=rf"{path}:4: a sts record in a dataset of retrieval records \(from "
                                        rf"{path}:1\): one dataset holds one task type"):
        JsonlSource(path)
    with pytest.raises(BadRecord, match=rf"{path}:4: a sts record"):  # not a bad record to skip: the file is wrong
        JsonlSource(path, skip_bad_records=True)


def test_task_types_from_records_and_from_data_dataset_tasks(tmp_path, tokenizer):
    _write(tmp_path / "d" / "pairs.jsonl", _sts(16))
    _write(tmp_path / "d" / "labels.jsonl", _cls(16))
    _write(tmp_path / "d" / "triplets.jsonl", _triplets(16))
    cfg = DataConfig(paths=(str(tmp_path / "d"),), global_batch_size=8, num_negatives=2, num_workers=0)
    loader = make_loader(cfg, tokenizer)
    assert {s.name: s.task for s in loader.sources} == {"labels": "classification", "pairs": "sts",
                                                        "triplets": "retrieval"}
    lines = "\n".join(loader.summary_lines())
    assert "dataset pairs: sts, 16 records" in lines and "dataset labels: classification" in lines
    declared = DataConfig(**{**cfg.__dict__, "dataset_tasks": {"triplets": "classification", "nothere": "sts"}})
    loader = make_loader(declared, tokenizer)
    assert {s.name: s.task for s in loader.sources}["triplets"] == "classification"
    assert any("data.dataset_tasks names ['nothere']" in w for w in loader.warnings)
    wrong = DataConfig(**{**cfg.__dict__, "dataset_tasks": {"pairs": "retrieval"}})
    with pytest.raises(ValueError, match=r"data.dataset_tasks sets 'pairs' to 'retrieval', but its records are sts "
                                         r"records \(.*pairs.jsonl:1\)"):
        make_loader(wrong, tokenizer)
    _write(tmp_path / "e" / "pairs.jsonl", _triplets(16, k=lambda i: 0 if i == 5 else 2))
    lacking = DataConfig(paths=(str(tmp_path / "e"),), global_batch_size=8, num_negatives=2,
                         dataset_tasks={"pairs": "classification"})
    with pytest.raises(BadRecord, match=r"e/pairs.jsonl:6: a record without negatives in 'pairs', which "
                                        "data.dataset_tasks makes a classification dataset"):
        make_loader(lacking, tokenizer)
    with pytest.raises(ValueError, match="dataset_tasks\\['x'\\] = 'ranking'"):
        DataConfig(dataset_tasks={"x": "ranking"})
    no_negatives = DataConfig(paths=(str(tmp_path / "d" / "labels.jsonl"),), global_batch_size=8)
    with pytest.raises(ValueError, match="'labels' is a classification dataset, which trains against each record's "
                                         "own negatives: set data.classification_negatives"):
        make_loader(no_negatives, tokenizer)


# ------------------------------------------------------------------------------------------ what batches hold
def test_sts_batches_carry_their_labels_without_prefixes_or_negatives(tmp_path, tokenizer):
    path = _write(tmp_path / "sts.jsonl", _sts(32))
    cfg = DataConfig(paths=(path,), global_batch_size=16, num_negatives=3, num_workers=0, packing=False)
    loader = make_loader(cfg, tokenizer)
    by_text = {r["text"]: r for r in _sts(32)}
    for _ in range(3):
        batch = next(loader)
        assert batch["task"] == "sts" and "negative_input_ids" not in batch and "teacher_scores" not in batch
        queries = _texts(tokenizer, batch["query_input_ids"], batch["query_attention_mask"])
        pairs = _texts(tokenizer, batch["passage_input_ids"], batch["passage_attention_mask"])
        assert batch["labels"].dtype == np.float32 and batch["labels"].shape == (16,)
        for q, p, label in zip(queries, pairs, batch["labels"]):  # no "查询: " / "结果: " on STS pairs
            row = by_text[q.replace(" ", "")]
            assert p.replace(" ", "") == row["text_pair"] and label == row["label"]


def test_classification_negatives_are_the_records_own_never_lent(tmp_path, tokenizer):
    rows = _cls(32)
    path = _write(tmp_path / "cls.jsonl", rows)
    cfg = DataConfig(paths=(path,), global_batch_size=16, num_negatives=1, classification_negatives=4,
                     num_workers=0, packing=False, query_prefix="", passage_prefix="")
    loader = make_loader(cfg, tokenizer)
    report = loader.report()["cls"]
    assert report["negatives"] == 4 and report["records_with_repeated_negatives"] == 32  # 1..3 < 4: cycled
    by_text = {r["text"]: r for r in rows}
    for _ in range(2):
        batch = next(loader)
        assert batch["task"] == "classification" and batch["negative_input_ids"].shape[:2] == (16, 4)
        assert "teacher_scores" not in batch  # distillation is for retrieval batches
        queries = _texts(tokenizer, batch["query_input_ids"], batch["query_attention_mask"])
        for i, q in enumerate(queries):
            own = by_text[q.replace(" ", "")]["text_neg"]
            negs = _texts(tokenizer, batch["negative_input_ids"][i], batch["negative_attention_mask"][i])
            assert collections.Counter(n.replace(" ", "") for n in negs).keys() == set(own)  # every one of its own
            counts = collections.Counter(n.replace(" ", "") for n in negs)
            assert max(counts.values()) - min(counts.values()) <= 1  # cycled evenly


def test_teacher_scores_follow_the_chosen_passages(tmp_path, tokenizer):
    rows = []
    for i in range(32):
        row = {"query": f"查询{i}", "pos": [f"正{i}-{j}" for j in range(1 + i % 2)],
               "neg": [f"负{i}-{j}" for j in range(2 + i % 3)]}
        if i % 4:  # a quarter without teacher scores
            row["pos_scores"] = [10.0 * i + j for j in range(len(row["pos"]))]
            row["neg_scores"] = [10.0 * i + 5 + j for j in range(len(row["neg"]))]
        rows.append(row)
    rows.append({"query": "无负例", "pos": ["只有正例"], "pos_scores": [1.0]})  # gets lent negatives: no teacher
    path = _write(tmp_path / "bge.jsonl", rows)
    cfg = DataConfig(paths=(path,), global_batch_size=11, num_negatives=2, num_workers=0, packing=False,
                     passage_prefix="", seed=3)
    loader = make_loader(cfg, tokenizer)
    checked = 0
    for _ in range(6):
        batch = next(loader)
        assert batch["teacher_scores"].shape == (11, 3) and batch["has_teacher"].dtype == np.int32
        queries = _texts(tokenizer, batch["query_input_ids"], batch["query_attention_mask"])
        for i, rid in enumerate(batch["record_index"]):
            row, scores = rows[rid], batch["teacher_scores"][i]
            if "pos_scores" not in row or "neg" not in row:
                assert batch["has_teacher"][i] == 0 and not scores.any()
                continue
            assert batch["has_teacher"][i] == 1
            texts = [_texts(tokenizer, batch["passage_input_ids"][i:i + 1], batch["passage_attention_mask"][i:i + 1])[0],
                     *_texts(tokenizer, batch["negative_input_ids"][i], batch["negative_attention_mask"][i])]
            want = [row["pos_scores"][row["pos"].index(texts[0].replace(" ", ""))],
                    *[row["neg_scores"][row["neg"].index(t.replace(" ", ""))] for t in texts[1:]]]
            assert scores.tolist() == want, (queries[i], texts)
            assert texts[0].replace(" ", "") == row["pos"][positive_slot(3, "bge", 0, int(rid), len(row["pos"]))] \
                or len(row["pos"]) > 1
            checked += 1
    assert checked > 20


def test_bundled_hybrid_samples(tokenizer):
    names = sorted(p.stem for p in HYBRID.glob("*.jsonl"))
    assert names == ["concept_scored", "sentence_similarity", "topic_classification"]
    cfg = DataConfig(paths=(str(HYBRID),), global_batch_size=32, num_negatives=2, classification_negatives=3,
                     num_workers=0)
    loader = make_loader(cfg, tokenizer)
    assert {s.name: s.task for s in loader.sources} == {"concept_scored": "retrieval", "sentence_similarity": "sts",
                                                        "topic_classification": "classification"}
    assert sum(bad_record_counts(loader).values()) == 0
    labels = [r.label for r in loader.sources[1].records(range(len(loader.sources[1])))]
    assert set(labels) == {0.0, 1.0, 2.0, 3.0, 5.0}
    cls = loader.sources[2].records(range(len(loader.sources[2])))
    assert all(r.positives[0] not in r.negatives and len(r.negatives) >= 3 for r in cls)
    assert len({r.positives[0] for r in cls}) == 6  # six topics: rows share labels (no in-batch negatives)
    scored = loader.sources[0].records(range(len(loader.sources[0])))
    assert all(r.positive_scores[0] > max(r.negative_scores) for r in scored)


# ------------------------------------------------------------------------------------------ TFDS, format 4
def _prepare(*args):
    return subprocess.run([sys.executable, "-m", "piccolo_jax", "prepare", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_tfds_keeps_task_types_and_labels_and_reads_format_3_as_retrieval(tmp_path, tokenizer):
    pytest.importorskip("tensorflow_datasets")
    from piccolo_jax.data import tfds_store
    from piccolo_jax.data.sources import TfdsSource

    r = _prepare("--output", tmp_path / "tfds", "--workers", 1, HYBRID)
    assert r.returncode == 0, r.stderr
    for name in ("sentence_similarity", "topic_classification", "concept_scored"):
        tfds = TfdsSource(str(tmp_path / "tfds" / name / "1.0.0"))
        jsonl = JsonlSource(str(HYBRID / f"{name}.jsonl"))
        assert tfds.task == jsonl.task and tfds.records(range(len(jsonl))) == jsonl.records(range(len(jsonl)))
        assert tfds.task_ids.strides == (0,)  # one task: a constant, no file
        meta = tfds_store.read_source_file(tmp_path / "tfds" / name / "1.0.0")
        assert meta["format"] == 4 and meta["arrays"]["task_ids"]["constant"] == jsonl.task_ids[0]
    cfg = dict(global_batch_size=16, num_negatives=2, classification_negatives=3, num_workers=0, packing=False)
    a = make_loader(DataConfig(paths=(str(HYBRID),), **cfg), tokenizer)
    b = make_loader(DataConfig(paths=(str(tmp_path / "tfds"),), **cfg), tokenizer)
    for _ in range(8):
        p, q = next(a), next(b)
        assert all(np.array_equal(p[k], q[k]) if isinstance(p[k], np.ndarray) else p[k] == q[k] for k in p)
    # a dataset of format 3 (no task, no label, no task_ids): retrieval records, as written then
    old = tmp_path / "old" / "concept_scored" / "1.0.0"
    shutil.copytree(tmp_path / "tfds" / "concept_scored" / "1.0.0", old)
    meta = json.loads((old / tfds_store.SOURCE_FILE).read_text())
    meta["format"] = 3
    del meta["arrays"]["task_ids"]
    (old / tfds_store.SOURCE_FILE).write_text(json.dumps(meta))
    assert TfdsSource(str(old)).task == "retrieval"


def test_a_mixed_tfds_dataset_is_refused_naming_the_jsonl_line(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from piccolo_jax.data.sources import TfdsSource

    src = _write(tmp_path / "mixed.jsonl", _triplets(40) + _sts(3) + _triplets(2))
    r = _prepare("--output", tmp_path / "tfds", "--workers", 1, src)  # prepare converts what parses
    assert r.returncode == 0, r.stderr
    with pytest.raises(BadRecord, match=rf"{src}:41: a sts record in a dataset of retrieval records \(from {src}:1\)"):
        TfdsSource(str(tmp_path / "tfds" / "mixed" / "1.0.0"))

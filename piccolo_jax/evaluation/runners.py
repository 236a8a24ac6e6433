"""Embedding evaluation on local C-MTEB-style datasets (retrieval, STS, reranking) and an `mteb` adapter.

Dataset layouts and readers: `piccolo_jax.evaluation.tasks`; the mteb adapter: `piccolo_jax.evaluation.mteb_model`.

Metrics (values in [0, 1]; tables print them x 100 as C-MTEB does):

    retrieval  ndcg@10 (linear gain = qrels grade), mrr@10, recall@1/10/100, map@100 (trec_eval's
               map_cut_100), over the top 100 of an exact cosine search ranked as trec_eval ranks
               (ties by document id, descending); equal to pytrec_eval's and mteb's numbers: every query
               with a qrels entry counts, one whose grades are all 0 scores 0, and a relevant qrel to a
               document missing from the corpus still counts in the denominators
    STS        Spearman and Pearson correlation of cosine similarity with the gold score
    reranking  MAP (average precision of the candidate ranking) and mrr@10, per query, averaged;
               samples without a positive or a negative are left out and counted (as MTEB)

Instructions: with `instructions=True` queries are encoded with kind "query" and corpus / candidate passages
with kind "passage" (the encoder's prefixes: the model's sentence-transformers prompts, else piccolo's
"查询: " / "结果: "); STS texts never get a prefix.

Matryoshka (`evaluate_task_at_dims`): every text of a task is encoded once at full width, and the metrics
are computed again on the first d coordinates, renormalised, for each d (`inference.truncate_embeddings`,
what `Encoder.encode(..., dim=d)` returns).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from piccolo_jax.evaluation.mteb_model import MTEBModel  # noqa: F401  (re-exported)
from piccolo_jax.evaluation.tasks import (  # noqa: F401  (re-exported)
    RerankingTask,
    RetrievalTask,
    STSTask,
    detect_task,
    find_tasks,
    load_reranking,
    load_retrieval,
    load_sts,
    read_jsonl,
    read_qrels,
)

RETRIEVAL_KS = (1, 10, 100)


class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str], kind: str | None = None, **kwargs: Any) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------- metrics
def trec_order(doc_ids: Sequence[str], scores: Sequence[float]) -> list[str]:
    """Doc ids ranked as trec_eval ranks a run: score descending, exact ties by doc id descending.

    (trec_eval sorts on (score, docno) both descending, comparing docnos with strcmp; Python's str
    order is the same as the order of their UTF-8 bytes.)
    """
    return [d for d, _ in sorted(zip(doc_ids, scores), key=lambda x: (x[1], x[0]), reverse=True)]


def retrieval_metrics(ranked_ids: Sequence[Sequence[str]], query_ids: Sequence[str],
                      qrels: dict[str, dict[str, float]], ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, float]:
    """Mean ndcg@10, mrr@10, recall@k and map@max(ks), as trec_eval (pytrec_eval) and mteb compute them.

    ranked_ids[i] is the ranking of corpus ids for query_ids[i], best first (see `trec_order`), at
    least max(ks) long or the whole corpus. Per query q with R = {d: qrels[q][d] > 0} (grade = gain):

        ndcg@10    sum_{r<=10} g(d_r) / log2(r + 1)  /  the same sum over R's grades sorted descending
        mrr@10     1 / rank of the first d_r in R within the top 10, else 0
        recall@k   |R in top k| / |R|
        map@K      sum over hits d_r in R, r <= K, of (hits up to r) / r, divided by |R|  (map_cut_K)

    |R| counts every relevant qrel, also one naming a document the corpus lacks (trec_eval's num_rel).
    Evaluated queries are those with a qrels entry (as trec_eval); one whose grades are all 0 scores 0
    everywhere (as trec_eval and mteb; counted in "queries_without_relevant"). Queries without any
    qrels entry are left out and counted in "queries_without_qrels".
    """
    depth = max(ks)
    sums: dict[str, float] = {"ndcg@10": 0.0, "mrr@10": 0.0, f"map@{depth}": 0.0}
    sums.update({f"recall@{k}": 0.0 for k in ks})
    evaluated = without_relevant = 0
    for qid, ranking in zip(query_ids, ranked_ids):
        if qid not in qrels:
            continue
        evaluated += 1
        rel = {d: s for d, s in qrels[qid].items() if s > 0}
        if not rel:
            without_relevant += 1
            continue  # contributes 0 to every mean
        gains = [rel.get(d, 0.0) for d in ranking[:depth]]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:10]))
        ideal = sorted(rel.values(), reverse=True)[:10]
        sums["ndcg@10"] += dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        first = next((i for i, g in enumerate(gains[:10]) if g > 0), None)
        sums["mrr@10"] += 0.0 if first is None else 1.0 / (first + 1)
        for k in ks:
            sums[f"recall@{k}"] += sum(g > 0 for g in gains[:k]) / len(rel)
        hits, ap = 0, 0.0
        for i, g in enumerate(gains):
            if g > 0:
                hits += 1
                ap += hits / (i + 1)  # precision at this rank
        sums[f"map@{depth}"] += ap / len(rel)
    if not evaluated:
        raise ValueError("no query has a qrels entry")
    out = {k: v / evaluated for k, v in sums.items()}
    out["queries_evaluated"] = evaluated
    out["queries_without_relevant"] = without_relevant
    out["queries_without_qrels"] = len(query_ids) - evaluated
    return out


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N with ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0  # mean of ranks s+1 .. e
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if denom == 0:
        raise ValueError("correlation is undefined: one of the inputs is constant")
    return float(xc @ yc) / denom


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def sts_metrics(e1_nd: np.ndarray, e2_nd: np.ndarray, gold_n: np.ndarray) -> dict[str, float]:
    """Cosine similarity of each pair against the gold scores: {"cos_spearman", "cos_pearson"}."""
    cos_n = np.sum(_unit(e1_nd) * _unit(e2_nd), axis=1)
    return {"cos_spearman": spearman(cos_n, gold_n), "cos_pearson": pearson(cos_n, gold_n)}


def reranking_metrics(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean average precision and mrr@10 of ranking each sample's candidates by score (descending).

    Samples with no positive or no negative candidate are left out (as MTEB) and counted.
    """
    ap_sum, mrr_sum, n = 0.0, 0.0, 0
    for s, y in zip(scores, labels):
        y = np.asarray(y, dtype=bool)
        if y.all() or not y.any():
            continue
        ranked = y[np.argsort(-np.asarray(s), kind="stable")]
        hit_ranks = np.flatnonzero(ranked) + 1  # 1-based ranks of the positives
        ap_sum += float(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks))
        mrr_sum += 1.0 / hit_ranks[0] if hit_ranks[0] <= 10 else 0.0
        n += 1
    if not n:
        raise ValueError("no reranking sample has both a positive and a negative")
    return {"map": ap_sum / n, "mrr@10": mrr_sum / n, "samples_evaluated": n,
            "samples_skipped": len(scores) - n}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------- runners
def _kinds(instructions: bool) -> tuple[str | None, str | None]:
    return ("query", "passage") if instructions else (None, None)


def evaluate_retrieval(encoder: TextEncoder, task: RetrievalTask, *, instructions: bool = True,
                       top_k: int = 100, mesh=None, **encode_kwargs) -> dict[str, float]:
    """Encode queries and corpus, rank the top `top_k` by cosine (exact sharded search), score with qrels.

    Ranking is trec_eval's (`trec_order`): documents tied with the one at rank `top_k` are all fetched
    (the search widens until the tie group is complete), then ordered by id, so the cut at `top_k`
    keeps the same documents trec_eval keeps from a deeper run.
    """
    from piccolo_jax.inference.mining import top_k_search

    if top_k < 10:
        raise ValueError(f"top_k={top_k}: ndcg@10 and mrr@10 need at least the top 10")
    q_kind, p_kind = _kinds(instructions)
    q_qd = _unit(encoder.encode(task.query_texts, kind=q_kind, **encode_kwargs))
    c_cd = _unit(encoder.encode(task.corpus_texts, kind=p_kind, **encode_kwargs))
    n, depth = len(task.corpus_ids), min(top_k, len(task.corpus_ids))
    k = min(n, depth + 16)
    while True:
        scores_qk, idx_qk = top_k_search(q_qd, c_cd, k, mesh=mesh)
        if k == n or np.all(scores_qk[:, k - 1] < scores_qk[:, depth - 1]):
            break  # every document tied with rank `depth` is among the k fetched
        k = min(n, 2 * k)
    ranked = [trec_order([task.corpus_ids[j] for j in row], s_k.tolist())[:depth]
              for row, s_k in zip(idx_qk, scores_qk)]
    known = set(task.corpus_ids)
    out = retrieval_metrics(ranked, task.query_ids, task.qrels, ks=tuple(x for x in RETRIEVAL_KS if x <= top_k))
    out["qrels_unknown_corpus_ids"] = sum(d not in known for r in task.qrels.values() for d in r)
    return out


def evaluate_sts(encoder: TextEncoder, task: STSTask, **encode_kwargs) -> dict[str, float]:
    """Spearman / Pearson of the cosine similarity of each pair (no instruction prefix)."""
    e1 = encoder.encode(task.sentences1, kind=None, **encode_kwargs)
    e2 = encoder.encode(task.sentences2, kind=None, **encode_kwargs)
    return sts_metrics(e1, e2, task.scores)


def evaluate_reranking(encoder: TextEncoder, task: RerankingTask, *, instructions: bool = True,
                       **encode_kwargs) -> dict[str, float]:
    """MAP and mrr@10 of ranking each query's positives + negatives by cosine similarity."""
    q_kind, p_kind = _kinds(instructions)
    q_nd = _unit(encoder.encode(task.queries, kind=q_kind, **encode_kwargs))
    candidates = [c for pos, neg in zip(task.positives, task.negatives) for c in (*pos, *neg)]
    c_md = _unit(encoder.encode(candidates, kind=p_kind, **encode_kwargs))
    scores, labels, start = [], [], 0
    for i, (pos, neg) in enumerate(zip(task.positives, task.negatives)):
        n = len(pos) + len(neg)
        scores.append(c_md[start:start + n] @ q_nd[i])
        labels.append(np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)])
        start += n
    return reranking_metrics(scores, labels)


class _EncodeOnce:
    """An encoder view that encodes each (texts, kind) once at full width and answers `encode(..., dim=d)`
    from that (truncated and renormalised): one encoding per task for every Matryoshka dimension."""

    def __init__(self, encoder: TextEncoder):
        self.encoder, self.cache = encoder, {}

    def at(self, dim: int | None) -> TextEncoder:
        view = self

        class _At:
            def encode(self, texts, kind=None, **kwargs):
                return view.encode(texts, kind, dim=dim, **kwargs)
        return _At()

    def encode(self, texts, kind=None, dim=None, **kwargs):
        from piccolo_jax.inference.encoder import truncate_embeddings

        key = (kind, tuple(texts))
        if key not in self.cache:
            self.cache[key] = np.asarray(self.encoder.encode(list(texts), kind=kind, **kwargs), np.float32)
        full = self.cache[key]
        return full if dim is None else truncate_embeddings(full, dim)


def evaluate_task_at_dims(encoder: TextEncoder, kind: str, task, dims, *, instructions: bool = True,
                          top_k: int = 100, mesh=None, **encode_kwargs) -> tuple[dict, dict[int, dict]]:
    """(metrics at full width, {d: metrics on the first d coordinates, renormalised}) of a loaded task,
    each text encoded once (module doc)."""
    once = _EncodeOnce(encoder)
    full = evaluate_task(once.at(None), kind, task, instructions=instructions, top_k=top_k, mesh=mesh,
                         **encode_kwargs)
    by_dim = {int(d): evaluate_task(once.at(int(d)), kind, task, instructions=instructions, top_k=top_k,
                                    mesh=mesh, **encode_kwargs) for d in dims}
    return full, by_dim


def load_task(path: str | os.PathLike) -> tuple[str, RetrievalTask | STSTask | RerankingTask]:
    """(task type, task) of the task at `path`; bad files raise ValueError naming the file and line."""
    kind = detect_task(path)
    loader = {"retrieval": load_retrieval, "sts": load_sts, "reranking": load_reranking}[kind]
    return kind, loader(path)


def evaluate_task(encoder: TextEncoder, kind: str, task, *, instructions: bool = True, top_k: int = 100,
                  mesh=None, **encode_kwargs) -> dict[str, float]:
    """Metrics of a loaded task (`load_task`)."""
    if kind == "retrieval":
        return evaluate_retrieval(encoder, task, instructions=instructions, top_k=top_k, mesh=mesh, **encode_kwargs)
    if kind == "sts":
        return evaluate_sts(encoder, task, **encode_kwargs)
    return evaluate_reranking(encoder, task, instructions=instructions, **encode_kwargs)


def evaluate_path(encoder: TextEncoder, path: str | os.PathLike, *, instructions: bool = True,
                  top_k: int = 100, mesh=None, **encode_kwargs) -> tuple[str, dict[str, float]]:
    """(task type, metrics) of the task at `path` (see the module docstring for the layouts)."""
    kind, task = load_task(path)
    return kind, evaluate_task(encoder, kind, task, instructions=instructions, top_k=top_k, mesh=mesh,
                               **encode_kwargs)




def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Plain-text table, one block per task type, metrics x 100 (C-MTEB's convention)."""
    lines = []
    for kind in ("retrieval", "reranking", "sts"):
        rows = {name: r for name, r in results.items() if r["type"] == kind}
        if not rows:
            continue
        metrics = [m for m in next(iter(rows.values()))["metrics"] if isinstance(
            next(iter(rows.values()))["metrics"][m], float)]
        width = max(len(n) for n in (*rows, kind)) + 4
        width = max([width, *(len(f"{n} @{d}") + 4 for n, r in rows.items() for d in r.get("dims", {}))])
        lines.append(f"{'[' + kind + ']':<{width}}" + "".join(f"{m:>14}" for m in metrics))
        for name, r in rows.items():
            lines.append(f"{name:<{width}}" + "".join(f"{100 * r['metrics'][m]:>14.2f}" for m in metrics))
            for d, by_dim in r.get("dims", {}).items():  # Matryoshka rows: the first d coordinates
                lines.append(f"{f'{name} @{d}':<{width}}" + "".join(f"{100 * by_dim[m]:>14.2f}" for m in metrics))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"

"""Embedding evaluation on local C-MTEB-style datasets (retrieval, STS, reranking) and an `mteb` adapter.

Dataset layouts and readers: `piccolo_jax.eval_data`.

Metrics (values in [0, 1]; tables print them x 100 as C-MTEB does):

    retrieval  ndcg@10 (linear gain = qrels score, as trec_eval), mrr@10, recall@1/10/100, map@100
               (AP truncated at rank 100, divided by the number of relevant documents: trec_eval
               map_cut_100), over the top 100 of an exact cosine search; queries without a relevant
               document are left out and counted
    STS        Spearman and Pearson correlation of cosine similarity with the gold score
    reranking  MAP (average precision of the candidate ranking) and mrr@10, per query, averaged;
               samples without a positive or a negative are left out and counted (as MTEB)

Instructions: with `instructions=True` (piccolo) queries are encoded with kind "query" ("查询: ") and
corpus / candidate passages with kind "passage" ("结果: "); STS texts never get a prefix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from piccolo_jax.eval_data import (  # noqa: F401  (re-exported)
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
def retrieval_metrics(ranked_ids: Sequence[Sequence[str]], query_ids: Sequence[str],
                      qrels: dict[str, dict[str, float]], ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, float]:
    """Mean ndcg@10, mrr@10, recall@k and map@max(ks) over the queries that have a relevant document.

    ranked_ids[i] is the ranked list of corpus ids retrieved for query_ids[i] (best first, at least
    max(ks) long or the whole corpus). Relevant = qrels score > 0; the gain of NDCG is the score.
    """
    depth = max(ks)
    sums: dict[str, float] = {"ndcg@10": 0.0, "mrr@10": 0.0, f"map@{depth}": 0.0}
    sums.update({f"recall@{k}": 0.0 for k in ks})
    evaluated = 0
    for qid, ranking in zip(query_ids, ranked_ids):
        rel = {d: s for d, s in qrels.get(qid, {}).items() if s > 0}
        if not rel:
            continue
        evaluated += 1
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
        raise ValueError("no query has a relevant document (qrels score > 0)")
    out = {k: v / evaluated for k, v in sums.items()}
    out["queries_evaluated"] = evaluated
    out["queries_without_relevant"] = len(query_ids) - evaluated
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
    """Encode queries and corpus, take the exact top `top_k` by cosine (sharded search), score with qrels."""
    from piccolo_jax.mining import top_k_search

    if top_k < 10:
        raise ValueError(f"top_k={top_k}: ndcg@10 and mrr@10 need at least the top 10")
    q_kind, p_kind = _kinds(instructions)
    q_qd = _unit(encoder.encode(task.query_texts, kind=q_kind, **encode_kwargs))
    c_cd = _unit(encoder.encode(task.corpus_texts, kind=p_kind, **encode_kwargs))
    k = min(top_k, len(task.corpus_ids))
    _, idx_qk = top_k_search(q_qd, c_cd, k, mesh=mesh)
    ranked = [[task.corpus_ids[j] for j in row] for row in idx_qk]
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


def evaluate_path(encoder: TextEncoder, path: str | os.PathLike, *, instructions: bool = True,
                  top_k: int = 100, mesh=None, **encode_kwargs) -> tuple[str, dict[str, float]]:
    """(task type, metrics) of the task at `path` (see the module docstring for the layouts)."""
    kind = detect_task(path)
    if kind == "retrieval":
        return kind, evaluate_retrieval(encoder, load_retrieval(path), instructions=instructions, top_k=top_k,
                                        mesh=mesh, **encode_kwargs)
    if kind == "sts":
        return kind, evaluate_sts(encoder, load_sts(path), **encode_kwargs)
    return kind, evaluate_reranking(encoder, load_reranking(path), instructions=instructions, **encode_kwargs)


MAIN_METRIC = {"retrieval": "ndcg@10", "sts": "cos_spearman", "reranking": "map"}


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
        lines.append(f"{'[' + kind + ']':<{width}}" + "".join(f"{m:>14}" for m in metrics))
        for name, r in rows.items():
            lines.append(f"{name:<{width}}" + "".join(f"{100 * r['metrics'][m]:>14.2f}" for m in metrics))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ mteb adapter
class MTEBModel:
    """Wraps an `Encoder` in the encoder interface of the `mteb` package (C-MTEB tasks).

    Accepts both calling conventions mteb has used:
      * mteb 2: `encode(DataLoader of {"text": [...]}, *, task_metadata, hf_split, hf_subset, prompt_type)`
      * mteb 1.x: `encode(list_of_str, *, task_name, prompt_type)`
    and the older C-MTEB / BEIR retrieval hooks `encode_queries(list)` / `encode_corpus(list of
    {"title", "text"} or dict of lists)`. prompt_type "query" gets piccolo's query prefix, "document" /
    "passage" the passage prefix, None (STS, classification, clustering ...) no prefix.
    Returns float32 numpy [N, D], rows in input order.

        import mteb
        model = MTEBModel(Encoder.load("piccolo-base-zh"))
        tasks = mteb.get_tasks(tasks=["T2Retrieval", "AFQMC"])   # or a C-MTEB benchmark's task list
        mteb.MTEB(tasks=tasks).run(model)                         # mteb 1.x; mteb 2: mteb.evaluate(model, tasks)
    """

    def __init__(self, encoder: TextEncoder, *, instructions: bool = True, batch_size: int | None = None,
                 **encode_kwargs):
        self.encoder, self.instructions = encoder, instructions
        self.encode_kwargs = dict(encode_kwargs)
        if batch_size is not None:
            self.encode_kwargs["batch_size"] = batch_size

    def _encode(self, texts: list[str], kind: str | None) -> np.ndarray:
        return np.asarray(self.encoder.encode(texts, kind=kind if self.instructions else None,
                                              **self.encode_kwargs), dtype=np.float32)

    def encode(self, inputs: Any, *, prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        """Embeddings [N, D] of a sequence of strings or of an iterable of {"text": [...]} batches."""
        return self._encode(_texts_of(inputs), _kind_of(prompt_type))

    def encode_queries(self, queries: Sequence[str], **kwargs: Any) -> np.ndarray:
        return self._encode(_texts_of(queries), "query")

    def encode_corpus(self, corpus: Any, **kwargs: Any) -> np.ndarray:
        if isinstance(corpus, dict):  # {"title": [...], "text": [...]}
            titles = corpus.get("title") or [""] * len(corpus["text"])
            docs = [{"title": t, "text": x} for t, x in zip(titles, corpus["text"])]
        else:
            docs = list(corpus)
        texts = [d if isinstance(d, str) else (f"{d.get('title')} {d['text']}".strip() if d.get("title")
                                               else d["text"]) for d in docs]
        return self._encode(texts, "passage")

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity matrix [N, M]."""
        return _unit(np.atleast_2d(a)) @ _unit(np.atleast_2d(b)).T

    @staticmethod
    def similarity_pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity of row i of `a` with row i of `b`: [N]."""
        return np.sum(_unit(np.atleast_2d(a)) * _unit(np.atleast_2d(b)), axis=-1)


def _kind_of(prompt_type: Any) -> str | None:
    value = getattr(prompt_type, "value", prompt_type)
    if value is None:
        return None
    if value == "query":
        return "query"
    if value in ("document", "passage"):
        return "passage"
    raise ValueError(f"prompt_type={prompt_type!r}; expected query, document / passage or None")


def _texts_of(inputs: Any) -> list[str]:
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    if isinstance(inputs, (list, tuple)) and all(isinstance(t, str) for t in inputs):
        return list(inputs)
    texts: list[str] = []
    for i, batch in enumerate(inputs):  # mteb 2: a DataLoader of {"text": [...], ...} batches
        if not isinstance(batch, dict) or "text" not in batch:
            raise TypeError(f"inputs: item {i} is a {type(batch).__name__}; expected str or a batch dict "
                            "with a 'text' list")
        batch_texts = batch["text"]
        batch_texts = [batch_texts] if isinstance(batch_texts, str) else list(batch_texts)
        for j, t in enumerate(batch_texts):
            if not isinstance(t, str):
                raise TypeError(f"inputs: batch {i} text[{j}] is a {type(t).__name__}, expected str")
        texts.extend(batch_texts)
    return texts

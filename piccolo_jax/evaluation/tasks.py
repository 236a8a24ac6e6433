"""Readers for local C-MTEB-style evaluation datasets; every error names the file and line.

Local file layouts (UTF-8; JSONL = one JSON object per line, blank lines ignored):

    retrieval task = a directory holding
        corpus.jsonl    {"_id": "d1", "text": "...", "title": "..."}   (title optional; "id" also accepted)
        queries.jsonl   {"_id": "q1", "text": "..."}                   ("id" also accepted)
        qrels           qrels.tsv, qrels/test.tsv or qrels.jsonl: query-id, corpus-id, score
                        (TSV: three tab-separated columns, optional header line; JSONL keys
                        "query-id"/"corpus-id"/"score", or "qid"/"pid"/"score" as C-MTEB's qrels sets)
    STS task       = a .jsonl file of {"sentence1": "...", "sentence2": "...", "score": 4.2}
    reranking task = a .jsonl file of {"query": "...", "positive": ["..."], "negative": ["...", ...]}

`bundled` (a TASK argument of `piccolo-jax evaluate`, or a path given to `find_tasks`) names the sample
tasks that ship inside the package, from any directory; a local `bundled` in the current directory wins.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from piccolo_jax.io import resources
from piccolo_jax.io.text_files import read_jsonl


def _field(obj: dict, keys: Sequence[str], where: str, kind: type | tuple = str) -> Any:
    for key in keys:
        if key in obj:
            value = obj[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{where}: field {key!r} must be {_kind_name(kind)}, got {type(value).__name__}")
            return value
    raise ValueError(f"{where}: missing field {' or '.join(map(repr, keys))}")


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _id(value: Any, where: str) -> str:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: id must be a string or integer, got {type(value).__name__}")


@dataclasses.dataclass
class RetrievalTask:
    name: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, float]]  # query id -> {corpus id: relevance}


@dataclasses.dataclass
class STSTask:
    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray  # float64 [N]


@dataclasses.dataclass
class RerankingTask:
    name: str
    queries: list[str]
    positives: list[list[str]]
    negatives: list[list[str]]


def _texts_with_ids(path: Path, with_title: bool) -> tuple[list[str], list[str]]:
    ids, texts, seen = [], [], {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        doc_id = _id(_field(obj, ("_id", "id"), where, (str, int)), where)
        if doc_id in seen:
            raise ValueError(f"{where}: duplicate id {doc_id!r} (first at line {seen[doc_id]})")
        seen[doc_id] = lineno
        text = _field(obj, ("text",), where)
        title = obj.get("title") if with_title else None
        if title is not None and not isinstance(title, str):
            raise ValueError(f"{where}: field 'title' must be a string, got {type(title).__name__}")
        ids.append(doc_id)
        texts.append(f"{title} {text}" if title else text)  # BEIR / MTEB: "title text"
    if not ids:
        raise ValueError(f"{path}: no rows")
    return ids, texts


def _qrels_file(directory: Path) -> Path:
    for name in ("qrels.tsv", "qrels/test.tsv", "qrels.jsonl", "qrels/test.jsonl"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no qrels.tsv, qrels/test.tsv or qrels.jsonl")


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """query id -> {corpus id: score} from a TSV (optional header) or JSONL qrels file."""
    path = Path(path)
    qrels: dict[str, dict[str, float]] = {}

    def add(qid: str, did: str, score: Any, where: str) -> None:
        try:
            value = float(score)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: score {score!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{where}: score {score!r} is not finite")
        qrels.setdefault(qid, {})[did] = value

    if path.suffix == ".jsonl":
        for lineno, obj in read_jsonl(path):
            where = f"{path}:{lineno}"
            qid = _id(_field(obj, ("query-id", "qid"), where, (str, int)), where)
            did = _id(_field(obj, ("corpus-id", "pid"), where, (str, int)), where)
            add(qid, did, _field(obj, ("score",), where, (int, float)), where)
    else:
        with open(path, encoding="utf-8", newline="") as f:
            for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
                if not row or not "".join(row).strip():
                    continue
                where = f"{path}:{lineno}"
                if len(row) != 3:
                    raise ValueError(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                                     f"got {len(row)}")
                if lineno == 1 and not _is_number(row[2]):
                    continue  # header
                add(row[0], row[1], row[2], where)
    if not qrels:
        raise ValueError(f"{path}: no qrels")
    return qrels


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_retrieval(directory: str | os.PathLike) -> RetrievalTask:
    """Read a retrieval directory (corpus.jsonl, queries.jsonl, qrels); qrels must name known queries."""
    directory = Path(directory)
    corpus_ids, corpus_texts = _texts_with_ids(directory / "corpus.jsonl", with_title=True)
    query_ids, query_texts = _texts_with_ids(directory / "queries.jsonl", with_title=False)
    qrels_path = _qrels_file(directory)
    qrels = read_qrels(qrels_path)
    known = set(query_ids)
    unknown = sorted(q for q in qrels if q not in known)
    if unknown:
        raise ValueError(f"{qrels_path}: query ids not in queries.jsonl: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    return RetrievalTask(directory.name, corpus_ids, corpus_texts, query_ids, query_texts, qrels)


def load_sts(path: str | os.PathLike) -> STSTask:
    path = Path(path)
    s1, s2, scores = [], [], []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        s1.append(_field(obj, ("sentence1",), where))
        s2.append(_field(obj, ("sentence2",), where))
        scores.append(float(_field(obj, ("score",), where, (int, float))))
    if len(s1) < 2:
        raise ValueError(f"{path}: an STS set needs at least 2 pairs, found {len(s1)}")
    return STSTask(path.stem, s1, s2, np.asarray(scores, dtype=np.float64))


def load_reranking(path: str | os.PathLike) -> RerankingTask:
    path = Path(path)
    task = RerankingTask(path.stem, [], [], [])
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        task.queries.append(_field(obj, ("query",), where))
        for key, dest in (("positive", task.positives), ("negative", task.negatives)):
            items = _field(obj, (key,), where, (list, str))
            items = [items] if isinstance(items, str) else items
            for i, item in enumerate(items):
                if not isinstance(item, str):
                    raise ValueError(f"{where}: field {key!r}[{i}] must be a string, got {type(item).__name__}")
            dest.append(items)
    if not task.queries:
        raise ValueError(f"{path}: no rows")
    return task


def detect_task(path: str | os.PathLike) -> str:
    """"retrieval" for a directory with corpus.jsonl; "sts" / "reranking" for a .jsonl by its first row."""
    path = Path(path)
    if path.is_dir():
        if (path / "corpus.jsonl").is_file():
            return "retrieval"
        raise ValueError(f"{path}: a retrieval task directory needs corpus.jsonl, queries.jsonl and qrels")
    for lineno, obj in read_jsonl(path):
        if "sentence1" in obj:
            return "sts"
        if "query" in obj and "positive" in obj:
            return "reranking"
        raise ValueError(f"{path}:{lineno}: cannot tell the task: expected 'sentence1' (STS) or "
                         f"'query' + 'positive' (reranking); keys {sorted(obj)}")
    raise ValueError(f"{path}: empty file")


def task_path(arg: str | os.PathLike) -> Path:
    """One TASK argument as a path. The bare name `bundled` is the sample tasks that ship with the package
    (from any directory) unless a file or directory named `bundled` exists in the current directory: a
    local path always wins, as for `--config` (`./bundled` names only the local one)."""
    if os.fspath(arg) == resources.BUNDLED_EVAL and not os.path.exists(arg):
        return resources.bundled_eval_dir()
    return Path(arg)


def find_tasks(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Task paths: each argument is a task, or a directory whose children (one level) are tasks; `bundled`
    is the package's sample tasks (see `task_path`)."""
    out = []
    for p in map(task_path, paths):
        if not p.exists():
            hint = (f" (the sample tasks that ship with piccolo-jax are named {resources.BUNDLED_EVAL!r})"
                    if p.parts[-2:] == ("assets", "eval") else "")
            raise FileNotFoundError(f"{p}: no such file or directory{hint}")
        if p.is_dir() and not (p / "corpus.jsonl").is_file():
            children = sorted(c for c in p.iterdir() if (c.is_dir() and (c / "corpus.jsonl").is_file())
                              or (c.is_file() and c.suffix == ".jsonl"))
            if not children:
                raise ValueError(f"{p}: contains no retrieval directory and no .jsonl task file")
            out.extend(children)
        else:
            out.append(p)
    return out

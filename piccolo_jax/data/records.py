"""Training records and their JSONL formats.

Each record carries its task type, which chooses its loss (piccolo v2's hybrid training):

| format (`record_format`) | keys | task |
|---|---|---|
| "uniem": uniem / M3E / piccolo | `{"text": q, "text_pos": p}` (pair), `+ "text_neg": n \\| [n1, ...]` (triplet) | retrieval |
| "bge": FlagEmbedding | `{"query": q, "pos": [p1, ...], "neg": [n1, ...], "prompt": instruction, "pos_scores": [...], "neg_scores": [...]}` | retrieval |
| "scored_pair": uniem / piccolo v2 | `{"sentence1": a, "sentence2": b, "label": x}` or `{"text": a, "text_pair": b, "label": x}` | sts |
| "classification": piccolo v2 | `{"text": t, "text_pos": label \\| [labels], "text_neg": [other labels]}` | classification |

In BGE rows `neg`, `prompt` and the teacher scores are optional; `prompt`, when non-empty, replaces
the dataset's query prefix; `pos_scores` / `neg_scores` hold one teacher (reranker) score per
passage, both given or neither (`neg_scores` may be left out when there are no negatives). A label
is any finite JSON number (an STS grade 0..5, a 0/1 pair-classification label, a float), held at
float32 precision from parsing on (as the loss and the TFDS store take it); only the order of labels
matters to CoSENT. A classification record needs at least one negative: its
negatives are the other labels, never other rows of the batch.

sentence-transformers' column conventions are read as the rows above ("auto" only): `anchor` /
`query` + `positive` (+ `negative`, or `negative_1` ... `negative_n`) -> a uniem pair / triplet;
`query` + `answer` -> a pair; `sentence1` + `sentence2` + `score` -> a scored pair (`score` is the
label). A column map (`data.columns`, `columns=` here) renames a dataset's own columns to the keys
above first: {"text": "question", "text_pos": "answer"} reads the column "question" as "text".

"auto" decides per record by its keys: `query` -> bge; `sentence1` or `text_pair` -> scored_pair;
`text` -> uniem, or what piccolo v2's `type` column says ("cls_contrast" -> classification, "cosent"
-> scored_pair). In the uniem / scored_pair / classification formats a `type` must be one of
piccolo v2's ("retri_contrast", "cosent", "cls_contrast") and agree with the format; an unknown or
contradicting `type` is a bad record (a misread task would train with the wrong loss). Other
keys (BGE's `type`, ...) are ignored. Every text must be a non-empty string that is not all
whitespace; a violation raises `BadRecord` whose message the reader prefixes with `file:line`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from collections.abc import Mapping

from piccolo_jax.config.data import RECORD_FORMATS

PICCOLO_TYPES = {"retri_contrast": "retrieval", "cosent": "sts", "cls_contrast": "classification"}


class BadRecord(ValueError):
    """A record that cannot be used; str(e) says why (the reader adds the file and line)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One query with its positive passages (>= 1), hard negatives (>= 0) and optional instruction.

    task: "retrieval" (contrastive), "sts" (CoSENT on (query, positives[0]) with `label`) or
    "classification" (query against its positive and its own negatives only).
    label: the similarity label of a scored pair (sts only).
    positive_scores / negative_scores: teacher scores, one per positive / negative, or None.
    """

    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    prompt: str | None = None
    task: str = "retrieval"
    label: float | None = None
    positive_scores: tuple[float, ...] | None = None
    negative_scores: tuple[float, ...] | None = None


def _text(obj: dict, key: str) -> str:
    if key not in obj:
        raise BadRecord(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRecord(f"field {key!r} is empty")
    return value


def _text_list(obj: dict, key: str, *, allow_string: bool, allow_empty: bool) -> tuple[str, ...]:
    value = obj[key]
    if allow_string and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        kinds = "a string or a list of strings" if allow_string else "a list of strings"
        raise BadRecord(f"field {key!r} must be {kinds}, got {type(value).__name__}")
    if not value and not allow_empty:
        raise BadRecord(f"field {key!r} is an empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise BadRecord(f"field {key!r}[{i}] must be a string, got {type(item).__name__}")
        if not item.strip():
            raise BadRecord(f"field {key!r}[{i}] is empty")
    return tuple(value)


def _number(value, where: str) -> float:
    """A finite JSON number (int or float, not a bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(f"{where} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise BadRecord(f"{where} must be a finite number, got {value!r}")
    return number


def _float32(value: float, where: str) -> float:
    """`value` rounded to float32 (what the loss and the TFDS store hold), still finite."""
    out = float(struct.unpack("f", struct.pack("f", value))[0])
    if not math.isfinite(out):
        raise BadRecord(f"{where} must be finite in float32 (|x| < 3.4e38)")
    return out


def _scores(obj: dict, key: str, texts_key: str, count: int) -> tuple[float, ...]:
    value = obj[key]
    if not isinstance(value, list):
        raise BadRecord(f"field {key!r} must be a list of numbers, got {type(value).__name__}")
    if len(value) != count:
        raise BadRecord(f"field {key!r} has {len(value)} scores for {count} passages in {texts_key!r} "
                        "(one score per passage)")
    # Teacher scores enter the loss as float32 (and are stored so by `prepare`): kept at that precision
    # from the start, so that a record reads back equal from JSONL and from TFDS.
    scores = tuple(_number(v, f"field {key!r}[{i}]") for i, v in enumerate(value))
    out = tuple(float(struct.unpack("f", struct.pack("f", v))[0]) for v in scores)
    if not all(math.isfinite(v) for v in out):
        raise BadRecord(f"field {key!r}: scores must be finite in float32 (|score| < 3.4e38)")
    return out


def _piccolo_type(obj: dict, task: str, record_format: str) -> None:
    """piccolo v2's `type` column, when present, must name `task`."""
    if "type" not in obj:
        return
    value = obj["type"]
    if value not in PICCOLO_TYPES:
        raise BadRecord(f"field 'type' must be one of {sorted(PICCOLO_TYPES)} (piccolo v2), got {value!r}")
    if PICCOLO_TYPES[value] != task:
        raise BadRecord(f"field 'type' is {value!r} ({PICCOLO_TYPES[value]}), but the record is read as "
                        f"{record_format!r} ({task})")


def _uniem(obj: dict) -> Record:
    _piccolo_type(obj, "retrieval", "uniem")
    negatives = ()
    if "text_neg" in obj:
        negatives = _text_list(obj, "text_neg", allow_string=True, allow_empty=True)
    return Record(_text(obj, "text"), (_text(obj, "text_pos"),), negatives)


def _classification(obj: dict) -> Record:
    _piccolo_type(obj, "classification", "classification")
    text = _text(obj, "text")
    for key in ("text_pos", "text_neg"):
        if key not in obj:
            raise BadRecord(f"missing field {key!r}")
    positives = _text_list(obj, "text_pos", allow_string=True, allow_empty=False)
    negatives = _text_list(obj, "text_neg", allow_string=True, allow_empty=True)
    if not negatives:
        raise BadRecord("field 'text_neg' is empty: a classification record needs at least one negative "
                        "label (other rows of the batch are not its negatives)")
    return Record(text, positives, negatives, task="classification")


def _scored_pair(obj: dict) -> Record:
    _piccolo_type(obj, "sts", "scored_pair")
    if "sentence1" in obj and "text" in obj:
        raise BadRecord("ambiguous record: has both 'sentence1' (uniem) and 'text' (piccolo v2)")
    first, second = ("sentence1", "sentence2") if "sentence1" in obj else ("text", "text_pair")
    a, b = _text(obj, first), _text(obj, second)
    if "label" not in obj:
        raise BadRecord("missing field 'label'")
    return Record(a, (b,), task="sts", label=_float32(_number(obj["label"], "field 'label'"), "field 'label'"))


def _bge(obj: dict) -> Record:
    query = _text(obj, "query")
    if "pos" not in obj:
        raise BadRecord("missing field 'pos'")
    positives = _text_list(obj, "pos", allow_string=False, allow_empty=False)
    negatives = _text_list(obj, "neg", allow_string=False, allow_empty=True) if "neg" in obj else ()
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRecord(f"field 'prompt' must be a string, got {type(prompt).__name__}")
    positive_scores = negative_scores = None
    if "pos_scores" in obj:
        positive_scores = _scores(obj, "pos_scores", "pos", len(positives))
        if "neg_scores" in obj:
            negative_scores = _scores(obj, "neg_scores", "neg", len(negatives))
        elif negatives:
            raise BadRecord(f"field 'pos_scores' without 'neg_scores': teacher scores need one per passage, "
                            f"and 'neg' has {len(negatives)}")
        else:
            negative_scores = ()
    elif "neg_scores" in obj:
        raise BadRecord("field 'neg_scores' without 'pos_scores': teacher scores need one per passage")
    return Record(query, positives, negatives, prompt or None,
                  positive_scores=positive_scores, negative_scores=negative_scores)


_PARSERS = {"uniem": _uniem, "bge": _bge, "scored_pair": _scored_pair, "classification": _classification}


class UnknownSchema(BadRecord):
    """A record whose keys match no known format: no record of such a file can pass, so the readers
    name the columns seen and the column map to set, rather than offer to skip it."""


ST_NEGATIVE = re.compile(r"negative_(\d+)$")  # sentence-transformers' negative_1 ... negative_n


def _st_negatives(obj: dict) -> list:
    """The values of `negative` or `negative_1..n` (in number order), as a list."""
    numbered = sorted((int(m.group(1)), key) for key in obj if (m := ST_NEGATIVE.match(key)))
    if "negative" in obj and numbered:
        raise BadRecord(f"ambiguous record: has both 'negative' and {numbered[0][1]!r}")
    if "negative" in obj:
        value = obj["negative"]
        return list(value) if isinstance(value, list) else [value]
    expected = list(range(1, len(numbered) + 1))
    if [n for n, _ in numbered] != expected:
        raise BadRecord(f"negative columns {[k for _, k in numbered]}: expected negative_1 ... "
                        f"negative_{len(numbered)} without gaps")
    return [obj[key] for _, key in numbered]


def _from_sentence_transformers(obj: dict) -> dict:
    """sentence-transformers' columns renamed to ours (module doc); other records unchanged."""
    if "text" in obj or "pos" in obj:
        return obj
    first = "anchor" if "anchor" in obj else "query" if "query" in obj else None
    if first is not None:
        if first == "anchor" and "query" in obj:
            raise BadRecord("ambiguous record: has both 'anchor' and 'query'")
        second = "positive" if "positive" in obj else "answer" if "answer" in obj and first == "query" else None
        if second is None:
            return obj
        if "positive" in obj and "answer" in obj:
            raise BadRecord("ambiguous record: has both 'positive' and 'answer'")
        out = {"text": obj[first], "text_pos": obj[second]}
        negatives = _st_negatives(obj)
        if negatives:
            out["text_neg"] = negatives
        return out
    if "sentence1" in obj and "score" in obj:
        if "label" in obj:
            raise BadRecord("ambiguous record: has both 'score' and 'label'")
        return {**{k: v for k, v in obj.items() if k != "score"}, "label": obj["score"]}
    return obj


def apply_columns(obj: dict, columns: Mapping[str, str]) -> dict:
    """`obj` with its columns renamed by a column map {our key: their column}; a column the map names
    that the record lacks is a bad record."""
    out = {key: value for key, value in obj.items() if key not in columns.values()}
    for ours, theirs in columns.items():
        if theirs not in obj:
            raise BadRecord(f"missing column {theirs!r} (the column map reads it as {ours!r})")
        out[ours] = obj[theirs]
    return out


def _detect(obj: dict) -> str:
    """The format of an "auto" record, from its keys."""
    if "query" in obj and "text" in obj:
        raise BadRecord("ambiguous record: has both 'text' (uniem) and 'query' (BGE)")
    if "query" in obj:
        return "bge"
    if "text_pair" in obj and "text_pos" in obj:
        raise BadRecord("ambiguous record: has both 'text_pos' (triplet) and 'text_pair' (scored pair)")
    if "sentence1" in obj or "text_pair" in obj:
        return "scored_pair"
    if "text" in obj:  # piccolo v2's classification rows share the uniem keys; its `type` tells them apart
        return {"cls_contrast": "classification", "cosent": "scored_pair"}.get(obj.get("type"), "uniem")
    raise UnknownSchema(f"no known columns among {sorted(obj)} (known: text / text_pos / text_neg, query / pos / "
                        "neg, anchor or query / positive / negative, query / answer, sentence1 / sentence2 / "
                        "label or score)")


def record_from_json(obj, record_format: str = "auto", columns: Mapping[str, str] | None = None) -> Record:
    """A parsed JSON value -> Record, in one of RECORD_FORMATS ("auto": decided by the keys), after
    renaming its columns by `columns` (module doc)."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    if columns:
        obj = apply_columns(obj, columns)
    if record_format == "auto":
        obj = _from_sentence_transformers(obj)
        if "query" in obj and "pos" not in obj and "text" not in obj:
            raise UnknownSchema(f"a 'query' column without 'pos' (FlagEmbedding), 'positive' or 'answer' "
                                f"(sentence-transformers); columns: {sorted(obj)}")
        record_format = _detect(obj)
    if record_format not in _PARSERS:
        raise ValueError(f"unknown record format {record_format!r}; expected one of {RECORD_FORMATS}")
    return _PARSERS[record_format](obj)


def parse_line(raw: bytes, record_format: str = "auto", columns: Mapping[str, str] | None = None) -> Record:
    """One JSONL line (bytes, without its newline) -> Record, or BadRecord saying what is wrong."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(f"invalid UTF-8 at byte {e.start}") from None
    if not line.strip():
        raise BadRecord("empty line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(f"malformed JSON: {e.msg} at column {e.colno}") from None
    record = record_from_json(obj, record_format, columns)
    if "\\u" in line or "\\U" in line:  # escapes can smuggle in lone surrogates, which are not text
        for text in (record.query, *record.positives, *record.negatives, record.prompt or ""):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadRecord(f"invalid unicode (lone surrogate \\u{ord(text[e.start]):04x})") from None
    return record



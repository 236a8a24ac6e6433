"""Training records and their JSONL formats.

Two formats, told apart per record in "auto" mode by their keys:

* uniem / M3E / piccolo: `{"text": q, "text_pos": p}` (pair) or `{"text": q, "text_pos": p,
  "text_neg": n | [n1, n2, ...]}` (triplet);
* FlagEmbedding (BGE): `{"query": q, "pos": [p1, ...], "neg": [n1, ...], "prompt": instruction}`, where
  `neg` and `prompt` are optional and `prompt`, when non-empty, replaces the dataset's query prefix.

Other keys (BGE's pos_scores, type, ...) are ignored. Every text must be a non-empty string that is not
all whitespace; a violation raises `BadRecord` whose message the reader prefixes with `file:line`.
"""

from __future__ import annotations

import dataclasses
import json


class BadRecord(ValueError):
    """A record that cannot be used; str(e) says why (the reader adds the file and line)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One query with its positive passages (>= 1), hard negatives (>= 0) and optional instruction."""

    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    prompt: str | None = None


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


def _uniem(obj: dict) -> Record:
    negatives = ()
    if "text_neg" in obj:
        negatives = _text_list(obj, "text_neg", allow_string=True, allow_empty=True)
    return Record(_text(obj, "text"), (_text(obj, "text_pos"),), negatives)


def _bge(obj: dict) -> Record:
    query = _text(obj, "query")
    if "pos" not in obj:
        raise BadRecord("missing field 'pos'")
    positives = _text_list(obj, "pos", allow_string=False, allow_empty=False)
    negatives = _text_list(obj, "neg", allow_string=False, allow_empty=True) if "neg" in obj else ()
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRecord(f"field 'prompt' must be a string, got {type(prompt).__name__}")
    return Record(query, positives, negatives, prompt or None)


def record_from_json(obj, record_format: str = "auto") -> Record:
    """A parsed JSON value -> Record, in format "uniem", "bge" or "auto" (decided by the keys)."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    if record_format == "auto":
        if "query" in obj and "text" in obj:
            raise BadRecord("ambiguous record: has both 'text' (uniem) and 'query' (BGE)")
        if "query" in obj:
            record_format = "bge"
        elif "text" in obj:
            record_format = "uniem"
        else:
            raise BadRecord(f"record has neither 'text' (uniem) nor 'query' (BGE); keys: {sorted(obj)}")
    if record_format == "uniem":
        return _uniem(obj)
    if record_format == "bge":
        return _bge(obj)
    raise ValueError(f"unknown record format {record_format!r}")


def parse_line(raw: bytes, record_format: str = "auto") -> Record:
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
    record = record_from_json(obj, record_format)
    if "\\u" in line or "\\U" in line:  # escapes can smuggle in lone surrogates, which are not text
        for text in (record.query, *record.positives, *record.negatives, record.prompt or ""):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadRecord(f"invalid unicode (lone surrogate \\u{ord(text[e.start]):04x})") from None
    return record


def record_to_json(record: Record) -> dict:
    """Record -> the BGE JSON form (lossless for both formats)."""
    obj = {"query": record.query, "pos": list(record.positives), "neg": list(record.negatives)}
    if record.prompt:
        obj["prompt"] = record.prompt
    return obj

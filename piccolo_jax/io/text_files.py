"""Reading texts to embed: a plain text file (one text a line) or JSONL (one field a line).

A `.jsonl` file (any case) is always read as JSONL: `check_text_input` refuses one without a field and
lists the fields of its first record, so raw JSON lines are never embedded by mistake.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def decoded_lines(path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without its line ending) of every line; ValueError("path:line: ...")
    for a line that is not UTF-8. Reads the file as it goes (never whole)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\n").rstrip("\r")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; malformed lines raise ValueError naming file:line."""
    for lineno, line in decoded_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def iter_texts(path: Path, field: str | None, id_field: str | None = None) -> Iterator[tuple[str, str]]:
    """(id, text) per non-blank line; JSONL when `field` is given, else plain text.

    Ids are line numbers unless `id_field` names a JSONL field. Bad lines raise ValueError("path:line: ...").
    """
    if field is None:
        for lineno, line in decoded_lines(path):
            if line.strip():
                yield str(lineno), line
        return
    for lineno, obj in read_jsonl(path):
        if field not in obj:
            raise ValueError(f"{path}:{lineno}: missing field {field!r}")
        text = obj[field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, got {type(text).__name__}")
        if id_field is None:
            yield str(lineno), text
            continue
        if id_field not in obj:
            raise ValueError(f"{path}:{lineno}: missing id field {id_field!r}")
        yield document_id(obj[id_field], f"{path}:{lineno}", f"id field {id_field!r}"), text


def document_id(value, where: str, what: str) -> str:
    """An id value (a string or integer, one line) as the string written to the ids file; ValueError
    "where: ..." naming `what` (the JSONL field or table column) otherwise."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"{where}: {what} must be a string or integer")
    doc_id = str(value)
    if "\n" in doc_id or "\r" in doc_id:
        raise ValueError(f"{where}: id {doc_id!r} contains a line break")
    return doc_id


def count_lines(path: Path) -> tuple[int, int]:
    """(non-blank lines, blank lines) without holding the file; the same blank test as `iter_texts`."""
    texts = blank = 0
    for _, line in decoded_lines(path):
        if line.strip():
            texts += 1
        else:
            blank += 1
    return texts, blank


def first_record_fields(path: Path) -> tuple[int, list[str]]:
    """(line number, sorted keys) of the first non-blank line of a JSONL file; ValueError("path:line: ...")."""
    for lineno, obj in read_jsonl(path):
        return lineno, sorted(obj)
    raise ValueError(f"{path}: empty file")


def check_text_input(path: Path, field: str | None, option: str = "--field") -> None:
    """Refuse what `iter_texts` would misread: a missing file, or a .jsonl file without a field."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if field is None and path.suffix.lower() == ".jsonl":
        lineno, keys = first_record_fields(path)
        raise ValueError(f"{path}: a JSONL file needs {option} naming the text field; its first record (line "
                         f"{lineno}) has the fields {', '.join(keys) if keys else '(none)'}")

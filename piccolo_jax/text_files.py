"""Reading texts to embed: a plain text file (one text a line) or JSONL (one field a line)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_texts(path: Path, field: str | None, id_field: str | None = None) -> Iterator[tuple[str, str]]:
    """(id, text) per non-blank line; JSONL when `field` is given, else plain text.

    Ids are line numbers unless `id_field` names a JSONL field. Bad lines raise ValueError("path:line: ...").
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            if field is None:
                yield str(lineno), line
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(obj, dict) or field not in obj:
                raise ValueError(f"{path}:{lineno}: missing field {field!r}")
            text = obj[field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, got {type(text).__name__}")
            if id_field is None:
                yield str(lineno), text
                continue
            if id_field not in obj:
                raise ValueError(f"{path}:{lineno}: missing id field {id_field!r}")
            doc_id = obj[id_field]
            if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
                raise ValueError(f"{path}:{lineno}: id field {id_field!r} must be a string or integer")
            doc_id = str(doc_id)
            if "\n" in doc_id or "\r" in doc_id:
                raise ValueError(f"{path}:{lineno}: id {doc_id!r} contains a line break")
            yield doc_id, text


def count_lines(path: Path) -> tuple[int, int]:
    """(non-blank lines, blank lines) without holding the file; the same blank test as `iter_texts`."""
    texts = blank = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts += 1
            else:
                blank += 1
    return texts, blank

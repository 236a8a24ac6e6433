"""sentence-transformers prompts: the instructions a model's queries and passages are encoded with.

A model directory's `config_sentence_transformers.json` may hold `"prompts": {name: text}`; our two
kinds map onto its names as `SentenceTransformer.encode_query` / `encode_document` pick them:

    query    "query"
    passage  "document", else "passage", else "corpus"

`read_prompts(dir)` gives {"query": q, "passage": p} of a model that has a query or passage prompt (a kind
it has none for is ""), else None (no file, no such prompt): the caller's defaults apply then (piccolo's
"查询: " / "结果: "). `write_prompts(dir, q, p)` writes them back as {"query": q, "document": p} with
`"default_prompt_name": null`, keeping the file's other keys, so that `SentenceTransformer(dir)
.encode_query(x)` = `Encoder.encode(x, kind="query")` and `encode_document(x)` = kind "passage".
"""

from __future__ import annotations

import json

from piccolo_jax.io.storage import as_path

ST_CONFIG = "config_sentence_transformers.json"
QUERY_NAMES = ("query",)
PASSAGE_NAMES = ("document", "passage", "corpus")  # encode_document's order


def read_prompts(model_dir) -> dict[str, str] | None:
    """{"query", "passage"} prompts of `model_dir`'s sentence-transformers config, or None if it has none.

    Raises ValueError naming the file for invalid JSON or prompts that are not strings."""
    path = as_path(model_dir) / ST_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    prompts = config.get("prompts") if isinstance(config, dict) else None
    if prompts is None:
        return None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ValueError(f"{path}: \"prompts\" must map prompt names to strings, got {prompts!r}")
    query = next((prompts[n] for n in QUERY_NAMES if n in prompts), None)
    passage = next((prompts[n] for n in PASSAGE_NAMES if n in prompts), None)
    if query is None and passage is None:
        return None
    return {"query": query or "", "passage": passage or ""}


def write_prompts(model_dir, query_prefix: str, passage_prefix: str) -> None:
    """Set `model_dir`'s sentence-transformers query / document prompts, keeping its other settings and
    prompts (a "passage" or "corpus" prompt is replaced by "document")."""
    path = as_path(model_dir) / ST_CONFIG
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    others = {k: v for k, v in (config.get("prompts") or {}).items() if k not in QUERY_NAMES + PASSAGE_NAMES}
    config["prompts"] = {"query": query_prefix, "document": passage_prefix, **others}
    config["default_prompt_name"] = None
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

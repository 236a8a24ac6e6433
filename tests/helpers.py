"""Test-only helpers: references written for the tests (a record's JSON form, the packed layout of a
padded batch, bad-record counts of a loader), kept out of the library."""

from __future__ import annotations

import numpy as np

from piccolo_jax.data.packing import (
    PackingSpec,
    document_blocks,
    first_fit,
    pack_host_batch,
    query_blocks,
)
from piccolo_jax.data.records import Record


def bad_record_counts(loader) -> dict[str, int]:
    """Bad records skipped, per file (0 for clean files)."""
    return {f: n for s in loader.sources for f, n in s.bad_records.items()}


def record_to_json(record: Record) -> dict:
    """Record -> JSON that `record_from_json(_, "auto")` reads back to an equal Record.

    retrieval: the BGE form (with `pos_scores` / `neg_scores` when the record has teacher scores);
    sts: piccolo v2's `{"text", "text_pair", "label"}`; classification: piccolo v2's `{"text",
    "text_pos", "text_neg", "type": "cls_contrast"}` (`text_pos` a string when there is one label).
    """
    if record.task == "sts":
        return {"text": record.query, "text_pair": record.positives[0], "label": record.label}
    if record.task == "classification":
        positives = record.positives[0] if len(record.positives) == 1 else list(record.positives)
        return {"text": record.query, "text_pos": positives, "text_neg": list(record.negatives),
                "type": "cls_contrast"}
    obj = {"query": record.query, "pos": list(record.positives), "neg": list(record.negatives)}
    if record.prompt:
        obj["prompt"] = record.prompt
    if record.positive_scores is not None:
        obj["pos_scores"] = list(record.positive_scores)
        obj["neg_scores"] = list(record.negative_scores or ())
    return obj


def pack_padded(batch: dict, shards: int, num_chunks: int, pad_id: int = 0,
                rows: tuple[int, int] | None = None, lengths: tuple[int, int] | None = None) -> dict:
    """The packed layout (one host) of a padded batch (query_* [B, Tq], passage_* [B, Tp], negative_*
    [B, K, Tp]): first fit of the real token counts into rows of `lengths` (L_q, L_d) tokens (default the
    padded lengths; longer rows hold more texts); `rows` (R_q, R_d) default to the most any block needs."""
    def texts(ids, mask):
        return [list(r[:int(n)]) for r, n in zip(ids, mask.sum(axis=-1))]

    queries = texts(batch["query_input_ids"], batch["query_attention_mask"])
    passages = texts(batch["passage_input_ids"], batch["passage_attention_mask"])
    documents = [[p] for p in passages]
    if "negative_input_ids" in batch:
        b, k, tp = batch["negative_input_ids"].shape
        negs = texts(batch["negative_input_ids"].reshape(b * k, tp),
                     batch["negative_attention_mask"].reshape(b * k, tp))
        documents = [[p, *negs[i * k:(i + 1) * k]] for i, p in enumerate(passages)]
    lq, ld = lengths or (batch["query_input_ids"].shape[-1], batch["passage_input_ids"].shape[-1])
    q_len = np.fromiter(map(len, queries), np.int64, len(queries))
    d_len = np.array([[len(t) for t in d] for d in documents], np.int64)
    blocks = shards * num_chunks
    rq, rows_q, off_q = first_fit(query_blocks(q_len, blocks), lq)
    rd, rows_d, off_d = first_fit(document_blocks(d_len, blocks), ld)
    rows = rows or (int(rq.max()), int(rd.max()))
    spec = PackingSpec(shards, num_chunks, rows[0], lq, rows[1], ld)
    return pack_host_batch(queries, documents, spec, 0, {"query": (rows_q, off_q), "document": (rows_d, off_d)},
                           pad_id)

"""From a BatchPlan to this host's token arrays: pick positives and negatives, prefix, tokenise, pad.

Every choice is a counter-based hash of (seed, dataset, pass, record, slot), so any host computes the
choices of any row without state. Hard negatives: K of the record's own list drawn without replacement;
a record with 0 < n < K negatives cycles a shuffled copy of its list (repeats, as FlagEmbedding does);
a record with none gets the positives of K records of the same dataset that are not in the batch
(random negatives). Both cases are counted per dataset when the loader opens it, and reported.

What a batch holds follows its dataset's task type (`Source.task`; K from `DataConfig.negatives_for`):

    retrieval       query, positive, K negatives; with K > 0 also the teacher scores of the chosen passages,
                    `teacher_scores` [b, 1 + K] float32 and `has_teacher` [b] int32 (1 = the record has
                    teacher scores and its own negatives; random negatives lent by other records have none)
    sts             text (as the query), text_pair (as the positive), `labels` [b] float32; no negatives,
                    no instruction prefixes
    classification  text, its label text, K_cls of its own other labels (cycled when fewer), never lent

All hosts pad a global batch to the same lengths T without talking to each other: T is decided from the
per-record character bounds of ALL B rows (arrays every host holds), rounded up to `pad_multiple` and
capped at the max length; each host then tokenises only its own rows.

With packing (`DataConfig.packing`, shapes from `packing.PackingSpec`) every host reads the texts of all
B rows (not only its own: a record's stored bound covers its longest passage, too loose to pack by) and
bounds each text from its characters; those bounds decide, on every host alike, whether the batch fits
the packed shapes (`packed_layout`). If it does, each host tokenises and packs its own blocks
(`packing.pack_host_arrays`, on the `Ragged` token arrays of `Tokenizer.token_arrays`), else it pads the
batch as above (a fallback the loader counts). Reading all rows costs a multi-host run (hosts - 1) x B /
hosts more record reads per step, no more tokenising.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from piccolo_jax.config.data import DataConfig
from piccolo_jax.data.packing import (
    PackingSpec,
    document_blocks,
    first_fit,
    pack_host_arrays,
    query_blocks,
    token_counts,
)
from piccolo_jax.data.sampler import BatchPlan, name_key
from piccolo_jax.data.sources import Source
from piccolo_jax.text.tokenizer import Tokenizer, char_token_bounds

_TAG_POSITIVE, _TAG_NEGATIVE, _TAG_FILL = 11, 12, 13
_M1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 constants
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix(*keys) -> np.ndarray:
    """splitmix64 folded over the keys (ints or arrays, broadcast): uniform uint64 hashes."""
    shape = np.broadcast_shapes(*(np.shape(k) for k in keys))
    h = np.full(shape, _GOLDEN, np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        for key in keys:
            z = h ^ np.asarray(key).astype(np.uint64)
            z = z + _GOLDEN
            z = (z ^ (z >> np.uint64(30))) * _M1
            z = (z ^ (z >> np.uint64(27))) * _M2
            h = z ^ (z >> np.uint64(31))
    return h


def fill_record_ids(seed: int, dataset: str, epoch: int, record_ids: np.ndarray, batch_ids: np.ndarray,
                    num_records: int, k: int) -> np.ndarray:
    """[R, k] records lending a random negative to records `record_ids`, drawn among the records that
    are NOT in the global batch `batch_ids` (a lender inside the batch would be a false negative)."""
    outside = num_records - len(batch_ids)
    if outside < 1:
        raise ValueError(f"dataset {dataset!r}: records without negatives need random ones, but all "
                         f"{num_records} records are in the batch")
    draw = mix(seed, _TAG_FILL, name_key(dataset), epoch, record_ids[:, None], np.arange(k)[None, :])
    u = (draw % np.uint64(outside)).astype(np.int64)  # rank among the records outside the batch
    # The u-th id not in the sorted batch e_0 < e_1 < ... is u + #{j : e_j - j <= u}.
    excluded = np.sort(batch_ids)
    return u + np.searchsorted(excluded - np.arange(len(excluded)), u, side="right")


def negative_slots(seed: int, dataset: str, epoch: int, record_id, count, k: int) -> np.ndarray:
    """[k] indices into a record's `count` negatives: a seeded shuffle, cycled when count < k; for arrays
    `record_id`, `count` [R] (every count >= 1): [R, k], row r the slots of record_id[r]."""
    if np.ndim(record_id) == 0:
        return negative_slots(seed, dataset, epoch, np.array([record_id]), np.array([count]), k)[0]
    record_id, count = np.asarray(record_id, np.int64), np.asarray(count, np.int64)
    width = int(count.max(initial=1))
    keys = mix(seed, _TAG_NEGATIVE, name_key(dataset), epoch, record_id[:, None], np.arange(width)[None, :])
    keys[np.arange(width)[None, :] >= count[:, None]] = np.iinfo(np.uint64).max  # after the real ones
    order = np.argsort(keys, axis=1, kind="stable")
    return np.take_along_axis(order, np.arange(k)[None, :] % count[:, None], axis=1)


def positive_slot(seed: int, dataset: str, epoch: int, record_id, count):
    """Which of a record's `count` positives this pass uses (arrays in, int64 array out)."""
    slot = mix(seed, _TAG_POSITIVE, name_key(dataset), epoch, record_id) % np.asarray(count).astype(np.uint64)
    return int(slot) if np.ndim(slot) == 0 else slot.astype(np.int64)


TASK_KEYS = ("labels", "teacher_scores", "has_teacher")  # the per-row arrays a task type adds to a batch


def task_arrays(host_batch: dict) -> dict[str, np.ndarray]:
    """The task arrays (TASK_KEYS) a host batch carries, for the train step."""
    return {k: host_batch[k] for k in TASK_KEYS if k in host_batch}


def padded_length(bound: int, max_length: int, multiple: int) -> int:
    """min(max_length, bound rounded up to a multiple of `multiple`)."""
    return min(max_length, -(-bound // multiple) * multiple)


def text_bounds(plan: BatchPlan, source: Source, cfg: DataConfig, tokenizer: Tokenizer
                ) -> tuple[np.ndarray, np.ndarray]:
    """Upper bounds on the token count of every text of the global batch, identical on every host:
    queries [B] and documents [B, 1 + K] (positive, then the K negatives of the dataset's task), int64, each
    capped at its max length (prefix and [CLS] / [SEP] included; the max lengths when the tokenizer has no
    proven bound)."""
    rows, k = plan.record_ids, cfg.negatives_for(source.task)
    qmax, pmax = cfg.query_max_length, cfg.passage_max_length
    if not tokenizer.char_bound_holds:
        return np.full(len(rows), qmax, np.int64), np.full((len(rows), 1 + k), pmax, np.int64)
    query_prefix, passage_prefix = cfg.prefixes(source.name, source.task)
    prefix_q, prefix_p = (int(x) for x in char_token_bounds([query_prefix, passage_prefix]))
    extra = tokenizer.num_special
    q = source.query_bounds[rows].astype(np.int64) + prefix_q + extra
    d = np.repeat(source.passage_bounds[rows].astype(np.int64)[:, None], 1 + k, axis=1)
    if k and source.task == "retrieval":  # classification records always have their own negatives
        lacking = np.flatnonzero(source.num_negatives[rows] == 0)
        if len(lacking):  # their negatives are positives of other records (`fill_record_ids`)
            fill = fill_record_ids(cfg.seed, source.name, plan.epoch, rows[lacking], rows, len(source), k)
            d[lacking, 1:] = source.passage_bounds[fill].astype(np.int64)
    return np.minimum(q, qmax), np.minimum(d + prefix_p + extra, pmax)


def global_lengths(plan: BatchPlan, source: Source, cfg: DataConfig, tokenizer: Tokenizer) -> tuple[int, int]:
    """(Tq, Tp) for the whole global batch, identical on every host (see module doc)."""
    q, d = text_bounds(plan, source, cfg, tokenizer)
    return (padded_length(int(q.max()), cfg.query_max_length, cfg.pad_multiple),
            padded_length(int(d.max()), cfg.passage_max_length, cfg.pad_multiple))


class BatchTexts(NamedTuple):
    """Rows of a batch: prefixed texts and the task's per-row arrays (module doc; keys of TASK_KEYS)."""

    queries: list[str]  # [b]
    passages: list[str]  # [b] the positive (sts: the second text)
    negatives: list[str]  # [b K] row-major
    extra: dict[str, np.ndarray]  # labels / teacher_scores / has_teacher, [b, ...]

    def rows(self, lo: int, hi: int) -> "BatchTexts":
        """Rows [lo, hi)."""
        k = len(self.negatives) // max(len(self.queries), 1)
        return BatchTexts(self.queries[lo:hi], self.passages[lo:hi], self.negatives[lo * k:hi * k],
                          {key: v[lo:hi] for key, v in self.extra.items()})


def batch_texts(plan: BatchPlan, source: Source, cfg: DataConfig, rows: np.ndarray) -> BatchTexts:
    """The prefixed texts of rows `rows` of the batch (queries [b], positives [b], negatives [b K] row-major,
    K of the dataset's task) and its task's per-row arrays."""
    task, name = source.task, source.name
    query_prefix, passage_prefix = cfg.prefixes(name, task)
    records = source.records(rows)
    k = cfg.negatives_for(task)
    queries = [(r.prompt or query_prefix) + r.query for r in records]
    counts = np.fromiter((len(r.positives) for r in records), np.int64, len(records))
    chosen = positive_slot(cfg.seed, name, plan.epoch, rows, counts).tolist()
    passages = [passage_prefix + r.positives[c] for c, r in zip(chosen, records)]
    extra: dict[str, np.ndarray] = {}
    if task == "sts":
        extra["labels"] = np.array([r.label for r in records], np.float32)
    negatives = []
    if k:
        teacher, has_teacher = np.zeros((len(rows), 1 + k), np.float32), np.zeros(len(rows), np.int32)
        counts = np.fromiter((len(r.negatives) for r in records), np.int64, len(records))
        lacking = np.flatnonzero(counts == 0)  # retrieval only (Source.resolve_task)
        lenders = {}
        if len(lacking):
            fill = fill_record_ids(cfg.seed, name, plan.epoch, rows[lacking], plan.record_ids, len(source), k)
            lent = source.records(fill.reshape(-1))
            lenders = {i: lent[j * k:(j + 1) * k] for j, i in enumerate(lacking.tolist())}
        slots = negative_slots(cfg.seed, name, plan.epoch, rows, np.maximum(counts, 1), k).tolist()
        for i, r in enumerate(records):
            if i in lenders:
                negatives += [passage_prefix + other.positives[0] for other in lenders[i]]
                continue
            negatives += [passage_prefix + r.negatives[s] for s in slots[i]]
            if r.positive_scores is not None:  # the teacher's scores of exactly the passages chosen
                teacher[i, 0] = r.positive_scores[chosen[i]]
                teacher[i, 1:] = [r.negative_scores[s] for s in slots[i]]
                has_teacher[i] = 1
        if task == "retrieval":
            extra["teacher_scores"], extra["has_teacher"] = teacher, has_teacher
    return BatchTexts(queries, passages, negatives, extra)


def packing_bounds(texts: BatchTexts, cfg: DataConfig, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token-count upper bounds of the texts of a whole batch (`batch_texts` of all its rows), per text:
    queries [B], documents [B, 1 + K]; [CLS] / [SEP] included, capped at the max lengths (the max
    lengths themselves when the tokenizer's bound is not proven)."""
    queries, passages, negatives = texts[:3]
    b = len(queries)
    k = len(negatives) // max(b, 1)
    qmax, pmax = cfg.query_max_length, cfg.passage_max_length
    if not tokenizer.char_bound_holds:
        return np.full(b, qmax, np.int64), np.full((b, 1 + k), pmax, np.int64)
    extra = tokenizer.num_special
    q = np.minimum(char_token_bounds(queries) + extra, qmax)
    d = np.minimum(char_token_bounds(passages + negatives) + extra, pmax)
    return q, np.concatenate([d[:b, None], d[b:].reshape(b, k)], axis=1)


def packed_layout(bounds: tuple[np.ndarray, np.ndarray], spec: PackingSpec) -> dict | None:
    """The first-fit layout of the bounds of every block of the global batch ({"query": (rows, offsets),
    "document": ...}), or None when some block needs more rows than `spec` has (identical on every host)."""
    q, d = bounds
    blocks = spec.shards * spec.num_chunks
    rq, rows_q, off_q = first_fit(query_blocks(q, blocks), spec.query_length)
    rd, rows_d, off_d = first_fit(document_blocks(d, blocks), spec.document_length)
    if rq.max() > spec.query_rows or rd.max() > spec.document_rows:
        return None
    return {"query": (rows_q, off_q), "document": (rows_d, off_d)}


def build_host_batch(plan: BatchPlan, source: Source, cfg: DataConfig, tokenizer: Tokenizer,
                     process_index: int, process_count: int, packing: PackingSpec | None = None) -> dict:
    """This host's rows [process_index*b, (process_index+1)*b) of the global batch, b = B / hosts.

    Padded (packing None, or a batch that does not fit `packing`): query_input_ids / query_attention_mask
    [b, Tq], passage_input_ids / passage_attention_mask [b, Tp], and when K > 0 negative_input_ids /
    negative_attention_mask [b, K, Tp] (all int32; K of the dataset's task). Packed: the arrays of
    `packing.pack_host_batch`. Both carry record_index [b] int32, the task's arrays (TASK_KEYS, module doc)
    and the Python values step, dataset_index, dataset_name, task, and with `packing` a dict "packing"
    (real / computed tokens of this host, whether the batch fell back).
    """
    b = len(plan.record_ids) // process_count
    rows = plan.record_ids[process_index * b:(process_index + 1) * b]
    k, layout = cfg.negatives_for(source.task), None
    if packing is None:
        texts = batch_texts(plan, source, cfg, rows)
    else:  # every host bounds every text of the batch (reading all its records), then takes its own
        everything = batch_texts(plan, source, cfg, plan.record_ids)
        layout = packed_layout(packing_bounds(everything, cfg, tokenizer), packing)
        texts = everything.rows(process_index * b, (process_index + 1) * b)
    queries = tokenizer.token_arrays(texts.queries, cfg.query_max_length)
    passages = tokenizer.token_arrays(texts.passages, cfg.passage_max_length)
    negatives = tokenizer.token_arrays(texts.negatives, cfg.passage_max_length)  # [b K]; empty when K = 0
    info = {"record_index": rows.astype(np.int32), "step": plan.step, "dataset_index": plan.dataset,
            "dataset_name": source.name, "task": source.task, **texts.extra}
    if layout is not None:
        blocks_per_host = packing.shards * packing.num_chunks // process_count
        batch = pack_host_arrays(queries, passages, negatives, packing, process_index * blocks_per_host, layout,
                                 tokenizer.pad_id)
        return {**batch, **info}
    tq, tp = global_lengths(plan, source, cfg, tokenizer)
    batch = {}
    if k:
        neg = tokenizer.pad(negatives, tp)
        batch["negative_input_ids"] = neg["input_ids"].reshape(b, k, tp)
        batch["negative_attention_mask"] = neg["attention_mask"].reshape(b, k, tp)
    query, passage = tokenizer.pad(queries, tq), tokenizer.pad(passages, tp)
    batch.update({
        "query_input_ids": query["input_ids"], "query_attention_mask": query["attention_mask"],
        "passage_input_ids": passage["input_ids"], "passage_attention_mask": passage["attention_mask"], **info})
    if packing is not None:
        real, computed = token_counts(batch)
        batch["packing"] = {"real_tokens": real, "computed_tokens": computed, "fallback": True}
    return batch

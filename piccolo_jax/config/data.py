"""DataConfig: every setting of the data pipeline, a frozen dataclass of plain types."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

TASKS = ("retrieval", "sts", "classification")  # task types: each has its own loss (piccolo_jax.losses.hybrid)
RECORD_FORMATS = ("auto", "uniem", "bge", "scored_pair", "classification")  # data.record_format
QUERY_PREFIX, PASSAGE_PREFIX = "查询: ", "结果: "  # piccolo's instructions: the prefixes when nothing sets others
# The keys of those formats: what a column map (data.columns) may read a dataset's columns as.
RECORD_KEYS = frozenset({"text", "text_pos", "text_neg", "text_pair", "type", "query", "pos", "neg", "prompt",
                         "pos_scores", "neg_scores", "sentence1", "sentence2", "label"})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Settings of `make_loader`. Dataset names are file stems (JSONL) or TFDS builder names."""

    # Datasets: JSONL / Parquet / Arrow files, directories of them, TFDS or `datasets.save_to_disk` directories,
    # hub datasets hf://datasets/ORG/NAME[/CONFIG][:SPLIT][@REVISION]; one file (or Parquet shard set) = one dataset.
    paths: tuple[str, ...] = ()
    # "auto": each record by its keys ({"text", ...} uniem/M3E/piccolo, {"query", ...} FlagEmbedding/BGE,
    # {"sentence1", ...} / {"text_pair", ...} scored pairs); or one of "uniem", "bge", "scored_pair",
    # "classification" for every file.
    record_format: str = "auto"
    # (dataset name, {our key: their column}) pairs: a dataset's own column names read as ours, e.g.
    # {faq = {text = "question", text_pos = "answer"}}. Without one, sentence-transformers' columns (anchor /
    # positive / negative_1.., query / answer, sentence1 / sentence2 / score) and the formats above are known.
    columns: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    # (dataset name, task type) pairs, task "retrieval", "sts" or "classification": the loss of that dataset's
    # batches. A dataset not listed takes the task of its records (scored pairs: sts; piccolo v2 rows with
    # "type": "cls_contrast": classification; pairs, triplets, BGE rows: retrieval). Only retrieval-format
    # records can be set to "classification" (each then against its own negatives only). A dict is accepted.
    dataset_tasks: tuple[tuple[str, str], ...] = ()
    # (dataset name, weight) pairs; empty = mix by size (each epoch takes every full batch once, M3E).
    # A dict is accepted and converted.
    weights: tuple[tuple[str, float], ...] = ()
    # Seeds the dataset order, the shuffles and the negative draws; identical on every host.
    seed: int = 0
    # Rows of one global batch (all hosts together); each host gets global_batch_size / process_count.
    global_batch_size: int = 32
    # Hard negatives per query, K (piccolo: 2..7 in finetune); 0 = pairs only (pretrain).
    num_negatives: int = 0
    # Negatives per classification record, each from the record's own list (piccolo v2: up to 10), never lent
    # from other records; a record with fewer repeats its own. 0 = num_negatives.
    classification_negatives: int = 0
    # Token limits including [CLS] and [SEP] (and the prefix); longer texts are truncated.
    query_max_length: int = 64  # piccolo: 64 in finetune, 128 in pretrain
    passage_max_length: int = 512  # piccolo: 512 in finetune, 128 in pretrain
    # Padded lengths are multiples of this (capped at the max length): 512 / 64 = at most 8 shapes.
    pad_multiple: int = 64
    # Pack several texts into each row of max-length tokens (attention within each text), so the encoder
    # computes real tokens only; the same loss and gradients as padding. false: pad every batch side.
    packing: bool = True
    # Instructions prepended before tokenising, except on symmetric datasets. Unset (null): the --init model's
    # sentence-transformers prompts (config_sentence_transformers.json) when it has them, else piccolo's.
    query_prefix: str | None = None  # on queries; piccolo's "查询: "
    passage_prefix: str | None = None  # on positives and hard negatives; piccolo's "结果: "
    # Datasets whose two sides are alike (paraphrase, NLI): no prefix on either side. STS datasets (scored
    # pairs) never get the two prefixes above (as STS evaluation encodes without them); dataset_prefixes can.
    symmetric_datasets: tuple[str, ...] = ()
    # (dataset name, query prefix, passage prefix) overrides of the two prefixes above.
    dataset_prefixes: tuple[tuple[str, str, str], ...] = ()
    # False: the first bad record stops with file:line. True: skip it, count it per file, report.
    skip_bad_records: bool = False
    # A JSONL line longer than this is a bad record (1 MiB; a 512-token passage is ~2 KiB).
    max_record_bytes: int = 1 << 20
    # Background threads that read and tokenise batches (0 = in the caller's thread).
    num_workers: int = 2
    # Batches prepared ahead of the consumer.
    prefetch: int = 4

    def __post_init__(self):
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", (self.paths,))
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        if isinstance(self.weights, Mapping):
            object.__setattr__(self, "weights", tuple(self.weights.items()))
        if isinstance(self.dataset_tasks, Mapping):
            object.__setattr__(self, "dataset_tasks", tuple(self.dataset_tasks.items()))
        object.__setattr__(self, "dataset_tasks", tuple((str(n), str(t)) for n, t in self.dataset_tasks))
        if isinstance(self.columns, Mapping):
            object.__setattr__(self, "columns", tuple(self.columns.items()))
        object.__setattr__(self, "columns", tuple(
            (str(n), tuple(m.items()) if isinstance(m, Mapping) else tuple(tuple(p) for p in m))
            for n, m in self.columns))
        for name, mapping in self.columns:
            for ours, theirs in mapping:
                if ours not in RECORD_KEYS:
                    raise ValueError(f"columns[{name!r}]: {ours!r} is not a record key; expected one of "
                                     f"{sorted(RECORD_KEYS)}")
                if not isinstance(theirs, str) or not theirs:
                    raise ValueError(f"columns[{name!r}][{ours!r}] must name a column, got {theirs!r}")
        for name, task in self.dataset_tasks:
            if task not in TASKS:
                raise ValueError(f"dataset_tasks[{name!r}] = {task!r}; expected one of {TASKS}")
        object.__setattr__(self, "weights", tuple((str(n), float(w)) for n, w in self.weights))
        object.__setattr__(self, "symmetric_datasets", tuple(self.symmetric_datasets))
        object.__setattr__(self, "dataset_prefixes", tuple(tuple(p) for p in self.dataset_prefixes))
        if self.record_format not in RECORD_FORMATS:
            raise ValueError(f"record_format must be one of {RECORD_FORMATS}, got {self.record_format!r}")
        for field in ("global_batch_size", "query_max_length", "passage_max_length", "pad_multiple",
                      "max_record_bytes", "prefetch"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        for field in ("num_negatives", "classification_negatives", "num_workers"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if min(self.query_max_length, self.passage_max_length) < 3:
            raise ValueError("query_max_length and passage_max_length must leave room for [CLS], [SEP]")
        for name, weight in self.weights:
            if not weight >= 0:
                raise ValueError(f"weights[{name!r}] must be >= 0, got {weight}")
        for entry in self.dataset_prefixes:
            if len(entry) != 3 or not all(isinstance(x, str) for x in entry):
                raise ValueError(f"dataset_prefixes entries are (name, query_prefix, passage_prefix), "
                                 f"got {entry!r}")

    def prefixes(self, dataset: str, task: str = "retrieval") -> tuple[str, str]:
        """(query prefix, passage prefix) for one dataset of task type `task`."""
        for name, query_prefix, passage_prefix in self.dataset_prefixes:
            if name == dataset:
                return query_prefix, passage_prefix
        if dataset in self.symmetric_datasets or task == "sts":
            return "", ""
        return (QUERY_PREFIX if self.query_prefix is None else self.query_prefix,
                PASSAGE_PREFIX if self.passage_prefix is None else self.passage_prefix)

    def negatives_for(self, task: str) -> int:
        """Negatives per row of a batch of task type `task`: K, the classification K, or 0 for sts."""
        if task == "sts":
            return 0
        if task == "classification":
            return self.classification_negatives or self.num_negatives
        return self.num_negatives

    def columns_of(self, dataset: str) -> dict[str, str] | None:
        """The column map of `dataset` {our key: its column}, or None."""
        mapping = dict(self.columns).get(dataset)
        return dict(mapping) if mapping is not None else None

    def declared_task(self, dataset: str) -> str | None:
        """The task `dataset_tasks` gives `dataset`, or None."""
        return dict(self.dataset_tasks).get(dataset)

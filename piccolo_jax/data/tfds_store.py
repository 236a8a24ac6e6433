"""Records as a TFDS dataset in array_record files, written and read without TensorFlow.

Layout written by `write_dataset(jsonl, data_dir)`: `data_dir/<name>/1.0.0/` with TFDS's own files
(dataset_info.json, features.json, <name>-train.array_record-*) plus two of ours:

* `piccolo_stats.npz`: the per-record arrays query_bounds, passage_bounds, num_negatives, so that
  opening a large dataset does not read every record;
* `piccolo_source.json`: the JSONL file it came from and the bad records skipped while converting.

Records keep the JSONL order (shuffling disabled) and carry their source line number.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from piccolo_jax.data.records import Record
from piccolo_jax.data.sources import JsonlSource, RecordStats

VERSION = "1.0.0"
STATS_FILE = "piccolo_stats.npz"
SOURCE_FILE = "piccolo_source.json"
_WRITE_CHUNK = 1024


def tfds_name(stem: str) -> str:
    """A valid TFDS dataset name (snake_case, starting with a letter) for a file stem."""
    name = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")
    if not name or not name[0].isalpha():
        name = "ds_" + name
    return re.sub(r"_(\d)", r"\1", name)  # TFDS names have no underscore before a digit


def _builder_class(name: str, source: JsonlSource):
    """A GeneratorBasedBuilder subclass named `name` that yields `source`'s records in file order."""

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, disable_shuffling=True,
            description=f"piccolo-jax records converted from {os.path.basename(source.path)}",
            features=tfds.features.FeaturesDict({
                "query": tfds.features.Text(),
                "positives": tfds.features.Sequence(tfds.features.Text()),
                "negatives": tfds.features.Sequence(tfds.features.Text()),
                "prompt": tfds.features.Text(),  # "" = none
                "line": np.int64,  # 1-based line in the source JSONL file
            }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for start in range(0, len(source), _WRITE_CHUNK):
            ids = range(start, min(start + _WRITE_CHUNK, len(source)))
            for i, record in zip(ids, source.records(ids)):
                yield i, {"query": record.query, "positives": list(record.positives),
                          "negatives": list(record.negatives), "prompt": record.prompt or "",
                          "line": int(source.line_numbers[i])}

    camel = "".join(part[:1].upper() + part[1:] for part in name.split("_"))
    body = {"VERSION": tfds.core.Version(VERSION), "_info": _info,
            "_split_generators": _split_generators, "_generate_examples": _generate_examples}
    with tfds.core.registered.skip_registration():
        builder_class = type(camel, (tfds.core.GeneratorBasedBuilder,), body)
    if builder_class.name != name:
        raise ValueError(f"cannot name a TFDS dataset {name!r} (TFDS derives {builder_class.name!r})")
    return builder_class


def write_dataset(jsonl_path: str, data_dir: str, name: str | None = None, record_format: str = "auto",
                  skip_bad_records: bool = False, max_record_bytes: int = 1 << 20) -> str:
    """Convert one JSONL file into `data_dir/<name>/1.0.0` (array_record); returns that directory.

    Bad records stop the conversion with file:line unless `skip_bad_records`; skipped ones are counted
    in piccolo_source.json and reported again by every loader that opens the dataset.
    """
    source = JsonlSource(jsonl_path, record_format, skip_bad_records, max_record_bytes)
    name = name or tfds_name(source.name)
    if tfds_name(name) != name:
        raise ValueError(f"{name!r} is not a valid TFDS dataset name (try {tfds_name(name)!r})")
    builder = _builder_class(name, source)(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    out = os.path.join(data_dir, name, VERSION)
    np.savez(os.path.join(out, STATS_FILE), query_bounds=source.query_bounds,
             passage_bounds=source.passage_bounds, num_negatives=source.num_negatives)
    with open(os.path.join(out, SOURCE_FILE), "w", encoding="utf-8") as f:
        json.dump({"source": jsonl_path, "records": len(source), "bad_records": source.bad_records,
                   "bad_messages": source.bad_messages}, f, ensure_ascii=False, indent=2)
    return out


def to_record(item: dict) -> Record:
    """A decoded TFDS example (bytes fields) -> Record."""
    text = lambda b: b.decode("utf-8")  # noqa: E731
    prompt = text(item["prompt"])
    return Record(text(item["query"]), tuple(map(text, item["positives"])),
                  tuple(map(text, item["negatives"])), prompt or None)


def open_dataset(path: str, split: str = "train"):
    """(name, random-access data source, (query_bounds, passage_bounds, num_negatives), bad counts)."""
    builder = tfds.builder_from_directory(path)
    data = builder.as_data_source(split=split)
    stats_file = os.path.join(path, STATS_FILE)
    if os.path.exists(stats_file):
        with np.load(stats_file) as stats:
            arrays = tuple(stats[k].astype(np.int32) for k in ("query_bounds", "passage_bounds",
                                                                 "num_negatives"))
        if len(arrays[0]) != len(data):
            raise ValueError(f"{stats_file}: {len(arrays[0])} records, but the dataset has {len(data)}")
    else:  # a dataset not written by write_dataset: read it once
        stats = RecordStats()
        for start in range(0, len(data), _WRITE_CHUNK):
            for item in data.__getitems__(list(range(start, min(start + _WRITE_CHUNK, len(data))))):
                stats.add(to_record(item))
        arrays = stats.arrays()
    bad: dict[str, int] = {}
    source_file = os.path.join(path, SOURCE_FILE)
    if os.path.exists(source_file):
        with open(source_file, encoding="utf-8") as f:
            bad = json.load(f).get("bad_records", {})
    return builder.name, data, arrays, bad

"""Records as a TFDS dataset of array_record files, written and read without TensorFlow.

One dataset, `OUT/<name>/1.0.0/` (written by piccolo_jax.data.prepare):

    <name>-train.array_record-0000i-of-0000n   one tf.train.Example per record, in JSONL order
    dataset_info.json, features.json           TFDS's metadata: tfds.builder_from_directory and
                                               tfds.data_source read the dataset without us
    piccolo_source.json                        ours: input fingerprint, options, counts, bad records,
                                               array dtypes, histogram of negatives per record
    piccolo_<array>.npy                        ours: the per-record arrays (record_arrays), memory-mapped

Example features: query, prompt ("" = none) as Text; positives, negatives as Sequence(Text); line
(int64: the 1-based line in the JSONL file, or the 1-based row of a Parquet / Arrow table over its files
in order; `Origin` says which, from piccolo_source.json); BGE teacher scores (scored, positive_scores,
negative_scores); task (Text: "retrieval", "sts", "classification") and label (float32, a scored pair's label; 0 otherwise). `encode_example` builds the proto directly (~5 us a record,
TFDS's serializer ~40 us), keys sorted so that one input gives the same bytes in every run; a test
checks it is the proto TFDS's serializer makes and that TFDS's reader decodes it.

Records are grouped 32 to an array_record chunk (`group_size:32`, zstd 3). The reader holds ~35 bytes
of index per chunk in memory, so 1.1 bytes a record (440 MB at 400 M records) where TFDS's default of
one record a chunk costs 31 bytes a record (12.4 GB at 400 M); measured on one core with pretrain
records: 58k random reads/s against 115k at group size 1, and files 35% smaller because the zstd
window spans 32 records. TFDS's readers accept the files (they log that Grain prefers group size 1).
Shard readers are opened on first use, one lock each, positions sorted per shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from collections.abc import Sequence

import numpy as np

from piccolo_jax.data import record_arrays
from piccolo_jax.data.jsonl_scan import BadRecords
from piccolo_jax.data.records import Record

VERSION = "1.0.0"
SPLIT = "train"
# Of piccolo_source.json: 4 adds task types and labels (and the task_ids array); 3 = teacher scores without
# them (read as retrieval records); 2 = the same without scores; 1 = piccolo_stats.npz written by TFDS's
# GeneratorBasedBuilder.
FORMAT = 4
READABLE_FORMATS = (2, 3, 4)
SOURCE_FILE = "piccolo_source.json"
OLD_STATS_FILE = "piccolo_stats.npz"
GROUP_SIZE = 32
WRITER_OPTIONS = f"group_size:{GROUP_SIZE}"  # zstd:3 is array_record's default compression
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access, in the calling thread


def tfds_name(stem: str) -> str:
    """A valid TFDS dataset name (snake_case, starting with a letter) for a file stem."""
    name = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")
    if not name or not name[0].isalpha():
        name = "ds_" + name
    return re.sub(r"_(\d)", r"\1", name)  # TFDS names have no underscore before a digit


def shard_file(name: str, index: int, count: int) -> str:
    """TFDS's file name of shard `index` of `count` (template {DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y})."""
    return f"{name}-{SPLIT}.array_record-{index:05d}-of-{count:05d}"


def features():
    """The TFDS FeaturesDict of a record."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "query": tfds.features.Text(),
        "positives": tfds.features.Sequence(tfds.features.Text()),
        "negatives": tfds.features.Sequence(tfds.features.Text()),
        "prompt": tfds.features.Text(),  # "" = none
        "line": np.int64,  # 1-based line in the source JSONL file, or row of the source table (Origin)
        # BGE teacher scores, one per positive / negative; "scored" 0 = the record has none
        "scored": np.int64,
        "positive_scores": tfds.features.Sequence(np.float32),
        "negative_scores": tfds.features.Sequence(np.float32),
        "task": tfds.features.Text(),  # records.TASKS
        "label": np.float32,  # a scored pair's label (task "sts"); 0 for the other tasks
    })


def _example_class():
    from tensorflow_datasets.proto import tf_example_pb2

    return tf_example_pb2.Example


def encode_example(record: Record, line: int, example_class=None) -> bytes:
    """A record as the serialized tf.train.Example TFDS writes for `features()`."""
    example = (example_class or _example_class())()
    feature = example.features.feature
    feature["query"].bytes_list.value.append(record.query.encode("utf-8"))
    feature["positives"].bytes_list.value.extend([p.encode("utf-8") for p in record.positives])
    feature["negatives"].bytes_list.value.extend([n.encode("utf-8") for n in record.negatives])
    feature["prompt"].bytes_list.value.append((record.prompt or "").encode("utf-8"))
    feature["line"].int64_list.value.append(line)
    scored = record.positive_scores is not None
    feature["scored"].int64_list.value.append(int(scored))
    feature["positive_scores"].float_list.value.extend(record.positive_scores or ())
    feature["negative_scores"].float_list.value.extend(record.negative_scores or ())
    feature["task"].bytes_list.value.append(record.task.encode("utf-8"))
    feature["label"].float_list.value.append(record.label if record.label is not None else 0.0)
    return example.SerializeToString(deterministic=True)  # keys sorted: the same bytes in every process


def decode_example(raw: bytes, example_class=None) -> Record:
    """A serialized example of `features()` -> Record."""
    feature = (example_class or _example_class()).FromString(raw).features.feature
    texts = lambda key: tuple(v.decode("utf-8") for v in feature[key].bytes_list.value)  # noqa: E731
    (query,), (prompt,) = texts("query"), texts("prompt")
    task = texts("task")[0] if "task" in feature else "retrieval"  # format <= 3: retrieval records only
    extra = {"task": task}
    if task == "sts":
        extra["label"] = float(feature["label"].float_list.value[0])
    if "scored" in feature and feature["scored"].int64_list.value[0]:  # format 2 has no scores
        scores = lambda key: tuple(float(v) for v in feature[key].float_list.value)  # noqa: E731
        extra.update(positive_scores=scores("positive_scores"), negative_scores=scores("negative_scores"))
    return Record(query, texts("positives"), texts("negatives"), prompt or None, **extra)


def example_line(raw: bytes, example_class=None) -> int:
    """The JSONL line number (or table row, see Origin) a serialized example was read from."""
    return int((example_class or _example_class()).FromString(raw).features.feature["line"].int64_list.value[0])


class ShardWriter:
    """Writes encoded records into one array_record file."""

    def __init__(self, path: str):
        from array_record.python import array_record_module

        self.path = path
        self._writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
        self._example = _example_class()
        self.records = 0

    def write(self, record: Record, line: int) -> None:
        self._writer.write(encode_example(record, line, self._example))
        self.records += 1

    def close(self) -> int:
        """Close the file; returns its size in bytes."""
        self._writer.close()
        return os.path.getsize(self.path)


def write_metadata(version_dir: str, name: str, shard_lengths: Sequence[int], num_bytes: int,
                   description: str) -> None:
    """TFDS's dataset_info.json and features.json for the shard files already in `version_dir`."""
    import tensorflow_datasets as tfds

    split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=list(shard_lengths), num_bytes=num_bytes)
    tfds.folder_dataset.write_metadata(data_dir=version_dir, features=features(), split_infos=[split],
                                       version=VERSION, check_data=False, description=description,
                                       disable_shuffling=True)
    with open(os.path.join(version_dir, "dataset_info.json"), encoding="utf-8") as f:
        if json.load(f).get("name") != name:
            raise ValueError(f"{version_dir}: TFDS did not derive the dataset name {name!r}")


class TfdsRecords:
    """Random access to the encoded records of array_record shards (`read(ids)` -> bytes)."""

    def __init__(self, paths: Sequence[str], shard_lengths: Sequence[int]):
        self.paths = [str(p) for p in paths]
        self.ends = np.cumsum(np.asarray(shard_lengths, np.int64))  # records before each shard's end
        self._readers: list = [None] * len(self.paths)
        self._locks = [threading.Lock() for _ in self.paths]

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _reader(self, shard: int):
        if self._readers[shard] is None:
            from array_record.python import array_record_module

            self._readers[shard] = array_record_module.ArrayRecordReader(
                self.paths[shard], _READER_OPTIONS, file_reader_buffer_size=32768)
        return self._readers[shard]

    def read(self, ids: Sequence[int]) -> list[bytes]:
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"record ids must be in [0, {len(self)}), got {ids.min()}..{ids.max()}")
        shard = np.searchsorted(self.ends, ids, side="right")
        position = ids - np.concatenate([[0], self.ends])[shard]
        out: list = [None] * len(ids)
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            rows = rows[np.argsort(position[rows], kind="stable")]
            with self._locks[s]:
                raws = self._reader(int(s)).read(position[rows].tolist())
            for row, raw in zip(rows, raws):
                out[row] = raw
        return out


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where the records of a prepared dataset came from: `where(n)` turns a record's `line` feature into
    "file:n" (a JSONL file) or "file row r" (a Parquet / Arrow table: n counts the rows of its files in
    order, from 1; r is the row within the file holding it, from 1, so pyarrow's index r - 1)."""

    source: str  # the input as prepare was given it (a JSONL file, a Parquet file, `dir/NAME-*.parquet`, a hub id)
    files: tuple[tuple[str, int], ...] = ()  # a table's (file, rows), in order; empty for a JSONL file

    @classmethod
    def of(cls, meta: dict, default: str) -> "Origin":
        """The origin piccolo_source.json `meta` records (`default`: the source when it names none)."""
        inputs = (meta.get("fingerprint") or {}).get("inputs")
        files = tuple((f["path"], int(f["rows"])) for f in inputs) if inputs else ()
        return cls(meta.get("source") or default, files)

    def where(self, n: int) -> str:
        if not self.files:
            return f"{self.source}:{n}"
        row = n
        for file, rows in self.files:
            if 0 < row <= rows:
                return f"{file} row {row}"
            row -= rows
        return f"{self.source} row {n}"


@dataclasses.dataclass
class OpenedDataset:
    name: str
    records: TfdsRecords
    arrays: tuple[np.ndarray, ...]  # record_arrays.ARRAY_NAMES: query_bounds, ..., task_ids
    bad: BadRecords | None  # what was skipped converting it (None: not written by us)
    negatives_histogram: dict[int, int] | None
    source: str | None = None  # the input it was prepared from (None: not written by us)
    origin: Origin | None = None  # where its records came from: origin.where(example_line(raw))


def read_source_file(version_dir: str) -> dict | None:
    """piccolo_source.json of a dataset directory, or None when absent."""
    path = os.path.join(version_dir, SOURCE_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def open_dataset(path: str, split: str = SPLIT) -> OpenedDataset:
    """Open a TFDS array_record dataset for random access: the metadata and the memory-mapped arrays,
    nothing per record (shard readers open on first read). Datasets of the older layout (.npz arrays)
    and foreign ones (arrays computed by reading every record once) are accepted."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(path)
    info = builder.info.splits[split]
    if builder.info.file_format is None or builder.info.file_format.value != "array_record":
        raise ValueError(f"{path}: file format {builder.info.file_format}, expected array_record "
                         f"(run `piccolo-jax prepare` on the JSONL files)")
    records = TfdsRecords(info.filepaths, info.shard_lengths)
    n = len(records)
    meta = read_source_file(path) or {}
    bad = None
    if "bad_records" in meta:
        (file, count), = meta["bad_records"].items() or [(meta.get("source", path), 0)]
        bad = BadRecords(file, count, list(meta.get("bad_messages", [])))
    histogram = None
    if meta.get("format") in READABLE_FORMATS:
        if meta["records"] != n:
            raise ValueError(f"{path}/{SOURCE_FILE}: {meta['records']} records, but the dataset has {n}")
        arrays = record_arrays.load_arrays(path, meta["arrays"], n)
        histogram = {int(k): v for k, v in meta["negatives_histogram"].items()}
    elif os.path.exists(os.path.join(path, OLD_STATS_FILE)):
        with np.load(os.path.join(path, OLD_STATS_FILE)) as stats:  # retrieval records only (no task_ids)
            arrays = tuple(record_arrays.narrow(stats[k] if k in stats else np.zeros(len(stats["query_bounds"]),
                                                                                   np.int64))
                           for k in record_arrays.ARRAY_NAMES)
        if len(arrays[0]) != n:
            raise ValueError(f"{path}/{OLD_STATS_FILE}: {len(arrays[0])} records, but the dataset has {n}")
    else:  # not written by us: read it once
        stats, example = record_arrays.RecordStats(), _example_class()
        for start in range(0, n, 4096):
            for raw in records.read(range(start, min(start + 4096, n))):
                stats.add(decode_example(raw, example))
        arrays = stats.arrays()
    return OpenedDataset(builder.name, records, arrays, bad, histogram, meta.get("source"), Origin.of(meta, path))

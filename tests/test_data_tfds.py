"""TFDS array_record datasets: `piccolo-jax prepare` output equals the JSONL it came from.

TFDS's own reader and serializer are the references for the files; a loader over the prepared data gives
the JSONL loader's batches bit for bit, whatever the sharding and the number of workers.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from piccolo_jax.config import DataConfig
from piccolo_jax.data import record_arrays, tfds_store  # noqa: E402
from piccolo_jax.data.loader import make_loader  # noqa: E402
from piccolo_jax.data.records import Record  # noqa: E402
from piccolo_jax.data.sources import JsonlSource, TfdsSource, open_sources  # noqa: E402
from piccolo_jax.text.tokenizer import Tokenizer, char_token_bounds  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(REPO, "assets", "data", "finetune")


ERROR = "piccolo-jax prepare: error: "  # how the command starts its one-line errors


def prepare(*args, cwd=None):
    """`python scripts/prepare_data.py ARGS` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "prepare_data.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(os.path.join(REPO, "assets", "tokenizer"))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tfds")
    r = prepare("--output", out, "--workers", 1, FINETUNE)
    assert r.returncode == 0, r.stderr
    return out


def _as_lists(item):
    def plain(v):
        if isinstance(v, bytes):
            return v.decode()
        if isinstance(v, (list, np.ndarray)) and np.ndim(v):
            return [plain(x) for x in v]
        return float(v) if isinstance(v, (float, np.floating)) else int(v)
    return {k: plain(v) for k, v in item.items()}


def _expected(row, line):
    negatives = row.get("text_neg", row.get("neg", []))
    return {"query": row.get("text", row.get("query")),
            "positives": [row["text_pos"]] if "text_pos" in row else row["pos"],
            "negatives": [negatives] if isinstance(negatives, str) else negatives,
            "prompt": row.get("prompt", ""), "line": line, "scored": int("pos_scores" in row),
            "positive_scores": row.get("pos_scores", []), "negative_scores": row.get("neg_scores", []),
            "task": "retrieval", "label": 0.0}


def test_round_trip_equals_jsonl(tfds_dir):
    for name in ("city_qa", "concept_bge"):
        with open(os.path.join(FINETUNE, f"{name}.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        data = tfds.data_source(name, data_dir=str(tfds_dir), split="train")  # TFDS's own reader
        assert len(data) == len(rows)
        for i, row in enumerate(rows):
            assert _as_lists(data[i]) == _expected(row, i + 1)


def test_examples_are_tfds_examples():
    from tensorflow_datasets.proto import tf_example_pb2

    Example = tf_example_pb2.Example
    features = tfds_store.features()
    records = [Record("问题", ("答案",)), Record("q", ("p1", "p2"), ("n1", "负例 two", "n3"), "为这个句子生成表示："),
               Record("😀 emoji", ("ü",), (), None),
               Record("q", ("p",), ("n1", "n2"), positive_scores=(0.5,), negative_scores=(-1.25, 3.0)),
               Record("今天天气好", ("天气不错",), task="sts", label=3.5), Record("a", ("b",), task="sts", label=-0.25),
               Record("这部电影太好看了", ("正面",), ("负面", "中性"), task="classification")]
    for line, record in enumerate(records, 1):
        example = {"query": record.query, "positives": list(record.positives), "negatives": list(record.negatives),
                   "prompt": record.prompt or "", "line": line, "scored": int(record.positive_scores is not None),
                   "positive_scores": list(record.positive_scores or ()),
                   "negative_scores": list(record.negative_scores or ()), "task": record.task,
                   "label": record.label or 0.0}
        raw, ours = features.serialize_example(example), tfds_store.encode_example(record, line)
        assert Example.FromString(ours) == Example.FromString(raw)  # the same proto (map order aside)
        assert ours == tfds_store.encode_example(record, line)  # deterministic bytes
        assert tfds_store.decode_example(raw) == record
        assert _as_lists(features.deserialize_example_np(ours)) == example


def test_arrays_are_narrow_memory_maps_equal_to_the_formula(tfds_dir):
    source = TfdsSource(str(tfds_dir / "city_qa" / "1.0.0"))
    with open(os.path.join(FINETUNE, "city_qa.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    negatives = [[r["text_neg"]] if isinstance(r["text_neg"], str) else r["text_neg"] for r in rows]
    query = char_token_bounds([r["text"] for r in rows])
    passage = [max(char_token_bounds([r["text_pos"], *n])) for r, n in zip(rows, negatives)]
    for values, expected in ((source.query_bounds, query), (source.passage_bounds, passage),
                             (source.num_negatives, [len(n) for n in negatives])):
        assert isinstance(values, np.memmap) and not values.flags.writeable
        assert values.dtype == np.dtype(np.uint8 if max(expected) < 256 else np.uint16)
        assert values.tolist() == list(expected)
    k = 5
    assert source.negatives_shortfall(k) == (0, sum(0 < len(n) < k for n in negatives))


def test_narrowing_is_exact_up_to_the_cap():
    assert record_arrays.narrow(np.array([0, 255])).dtype == np.uint8
    assert record_arrays.narrow(np.array([0, 256])).dtype == np.uint16
    clipped = record_arrays.narrow(np.array([3, 70_000]))
    assert clipped.tolist() == [3, 65_535] and clipped.dtype == np.uint16
    constant = record_arrays.narrow(np.zeros(10, np.int64))
    assert constant.strides == (0,) and constant.tolist() == [0] * 10


def test_loader_batches_equal_over_tfds_and_jsonl(tfds_dir, tokenizer):
    make = lambda path, workers: make_loader(DataConfig(  # noqa: E731
        paths=(path,), global_batch_size=32, num_negatives=7, passage_max_length=128, pad_multiple=16,
        num_workers=workers), tokenizer)
    jsonl, stored = make(FINETUNE, 0), make(str(tfds_dir), 2)
    assert [s.name for s in stored.sources] == ["city_qa", "concept_bge"]
    for _ in range(20):
        a, b = next(jsonl), next(stored)
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]) if isinstance(a[key], np.ndarray) else a[key] == b[key]
    stored.close()


def _write_rows(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def test_shards_and_workers_change_nothing(tmp_path, tokenizer):
    """Cut into many shards by 2 worker processes (bad lines on the way): same records, lines, arrays, batches."""
    rows = []
    for i in range(300):
        row = {"text": f"第{i}个问题" + "长" * (i % 50), "text_pos": f"答案{i}" + "文" * (i * 7 % 400)}
        if i % 3:
            row["text_neg"] = [f"负例{i}-{j}" for j in range(i % 4)]
        rows.append(row)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    for at in (17, 140, 299):
        lines.insert(at, '{"text": "broken"\n')
    src = tmp_path / "src"
    src.mkdir()
    (src / "pairs.jsonl").write_text("".join(lines), encoding="utf-8")
    one, many = tmp_path / "one", tmp_path / "many"
    r1 = prepare("--output", one, "--workers", 1, "--skip-bad-records", src)
    r2 = prepare("--output", many, "--workers", 2, "--shard-bytes", 4000, "--skip-bad-records", src)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert "300 records, 3 bad records skipped" in r1.stdout and "300 records, 3 bad records skipped" in r2.stdout
    shards = sorted(os.listdir(many / "pairs" / "1.0.0"))
    assert sum(".array_record-" in f for f in shards) > 5
    data = tfds.data_source("pairs", data_dir=str(many), split="train")
    good_lines = [n for n, line in enumerate(lines, 1) if "broken" not in line]
    assert [int(data[i]["line"]) for i in range(len(data))] == good_lines
    a, b = TfdsSource(str(one / "pairs" / "1.0.0")), TfdsSource(str(many / "pairs" / "1.0.0"))
    jsonl = JsonlSource(str(src / "pairs.jsonl"), skip_bad_records=True)
    assert a.records(range(300)) == b.records(range(300)) == jsonl.records(range(300))
    for name in record_arrays.ARRAY_NAMES:
        assert np.array_equal(getattr(a, name), getattr(b, name))
        assert np.array_equal(getattr(b, name), getattr(jsonl, name))
        assert getattr(b, name).dtype == getattr(jsonl, name).dtype
    assert b.bad_records == {str(src / "pairs.jsonl"): 3}
    bad_lines = [n for n, line in enumerate(lines, 1) if "broken" in line]
    assert [m.split(": ")[0] for m in b.bad_messages] == [f"{src / 'pairs.jsonl'}:{n}" for n in bad_lines]
    cfg = dict(global_batch_size=16, num_negatives=2, passage_max_length=256, pad_multiple=32, num_workers=0,
               skip_bad_records=True)
    x, y = make_loader(DataConfig(paths=(str(src),), **cfg), tokenizer), \
        make_loader(DataConfig(paths=(str(many),), **cfg), tokenizer)
    for _ in range(25):
        p, q = next(x), next(y)
        assert all(np.array_equal(p[k], q[k]) if isinstance(p[k], np.ndarray) else p[k] == q[k] for k in p)


def test_clipped_bounds_give_the_unclipped_batches(tmp_path, tokenizer):
    """A 70,000-character passage: its bound is stored as 65,535, and the batches do not change."""
    rows = [{"text": f"问{i}", "text_pos": f"答{i}"} for i in range(8)]
    rows[3]["text_pos"] = "长" * 70_000
    _write_rows(tmp_path / "long.jsonl", rows)
    cfg = DataConfig(paths=(str(tmp_path),), global_batch_size=8, passage_max_length=512, num_workers=0)
    clipped = make_loader(cfg, tokenizer)
    assert int(clipped.sources[0].passage_bounds[3]) == 65_535
    unclipped = make_loader(cfg, tokenizer)
    source = unclipped.sources[0]
    source.passage_bounds = char_token_bounds([r.positives[0] for r in source.records(range(8))])
    assert source.passage_bounds[3] == 70_000
    for _ in range(3):
        p, q = next(clipped), next(unclipped)
        assert all(np.array_equal(p[k], q[k]) if isinstance(p[k], np.ndarray) else p[k] == q[k] for k in p)


def test_older_and_foreign_layouts_still_open(tfds_dir, tmp_path):
    new = TfdsSource(str(tfds_dir / "concept_bge" / "1.0.0"))
    old = tmp_path / "concept_bge" / "1.0.0"
    shutil.copytree(tfds_dir / "concept_bge" / "1.0.0", old)
    meta = json.loads((old / tfds_store.SOURCE_FILE).read_text())
    for f in old.glob("piccolo_*.npy"):
        f.unlink()
    (old / tfds_store.SOURCE_FILE).unlink()
    foreign = TfdsSource(str(old))  # no arrays at all: computed by reading every record once
    np.savez(old / tfds_store.OLD_STATS_FILE, query_bounds=new.query_bounds.astype(np.int32),
             passage_bounds=new.passage_bounds.astype(np.int32), num_negatives=new.num_negatives.astype(np.int32))
    (old / tfds_store.SOURCE_FILE).write_text(json.dumps({"source": meta["source"], "records": 480,
                                                          "bad_records": meta["bad_records"]}))
    older = TfdsSource(str(old))  # the .npz layout of format 1
    for name in record_arrays.ARRAY_NAMES:
        assert np.array_equal(getattr(new, name), getattr(foreign, name))
        assert np.array_equal(getattr(new, name), getattr(older, name))
        assert getattr(new, name).dtype == getattr(older, name).dtype
    assert new.records(range(480)) == older.records(range(480))
    assert older.bad_records == new.bad_records


# -- issue cases through the CLI ------------------------------------------------------------------------------


def _pairs(n, tag="v1"):
    return [{"text": f"{tag} 问题{i}", "text_pos": f"{tag} 答案{i}"} for i in range(n)]


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_rerun_reuses_unchanged_and_rebuilds_changed_inputs(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    _write_rows(src / "qa.jsonl", _pairs(135))
    _write_rows(src / "other.jsonl", _pairs(12))
    r = prepare("--output", out, src)
    assert r.returncode == 0, r.stderr
    assert f"{src / 'qa.jsonl'} -> {out / 'qa' / '1.0.0'}: 135 records, 0 bad records skipped" in r.stdout
    _write_rows(src / "qa.jsonl", _pairs(40, "v2"))  # edited: 40 lines now
    r = prepare("--output", out, src)
    assert r.returncode == 0, r.stderr
    assert "qa/1.0.0: rebuilt (input changed: 135 -> 40 lines" in r.stdout and ": 40 records" in r.stdout
    assert "other/1.0.0: reused (input unchanged: 12 lines" in r.stdout and ": 12 records," in r.stdout
    data = tfds.data_source("qa", data_dir=str(out), split="train")
    assert len(data) == 40 and data[39]["query"].decode() == "v2 问题39"
    os.utime(src / "qa.jsonl", ns=(1, 1))  # only the modification time changes
    r = prepare("--output", out, src / "qa.jsonl")
    assert "reused (input unchanged: 40 lines, sha256" in r.stdout and "modification time differs" in r.stdout
    r = prepare("--output", out, "--record-format", "uniem", src / "qa.jsonl")
    assert "rebuilt (options changed: record_format 'auto' -> 'uniem'): 40 records" in r.stdout
    (out / "qa" / "1.0.0" / "qa-train.array_record-00000-of-00001").write_bytes(b"")  # damaged
    r = prepare("--output", out, "--record-format", "uniem", src / "qa.jsonl")
    assert "rebuilt (qa-train.array_record-00000-of-00001 missing or damaged): 40 records" in r.stdout
    assert not [p for p in _tree(out) if ".piccolo" in p]


def test_two_inputs_with_one_name_are_refused(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        _write_rows(tmp_path / d / "same.jsonl", _pairs(3))
    r = prepare("--output", tmp_path / "out", tmp_path / "a", tmp_path / "b")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"{ERROR}{tmp_path / 'a' / 'same.jsonl'} and {tmp_path / 'b' / 'same.jsonl'} "
                                f"would both become dataset 'same' in {tmp_path / 'out'}; rename one")
    assert not (tmp_path / "out").exists()
    _write_rows(tmp_path / "a" / "Same.JSONL", _pairs(3))  # one name after snake_casing
    r = prepare("--output", tmp_path / "out", tmp_path / "a")
    assert r.returncode == 2 and "Same.JSONL and" in r.stderr and "same.jsonl would both become" in r.stderr


@pytest.mark.parametrize("case", ["empty", "blank_lines", "all_bad_skipped", "bad_without_skip"])
def test_empty_or_bad_input_leaves_nothing(tmp_path, case):
    src, out = tmp_path / "bad.jsonl", tmp_path / "out"
    content = {"empty": "", "blank_lines": "\n  \n", "all_bad_skipped": "{x\n[1]\n{\"text\": 1}\n",
               "bad_without_skip": json.dumps(_pairs(1)[0]) + "\n{broken\n"}[case]
    src.write_text(content, encoding="utf-8")
    args = ["--skip-bad-records"] if case in ("all_bad_skipped", "blank_lines") else []
    r = prepare("--output", out, *args, src)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith(ERROR)]
    assert len(error) == 1 and error == r.stderr.splitlines()[-1:]
    expected = {"empty": f"{ERROR}{src}: empty file, no records",
                "blank_lines": f"{ERROR}{src}: no good records, all 2 are bad (e.g. {src}:1: empty line)",
                "all_bad_skipped": f"{ERROR}{src}: no good records, all 3 are bad (e.g. {src}:1: malformed JSON",
                "bad_without_skip": f"{ERROR}{src}:2: malformed JSON"}[case]
    assert error[0].startswith(expected)
    if case == "bad_without_skip":
        assert error[0].endswith("(pass --skip-bad-records to skip and count such records)")
    assert _tree(out) == []


def test_failed_rebuild_keeps_the_previous_dataset(tmp_path):
    src, out = tmp_path / "qa.jsonl", tmp_path / "out"
    _write_rows(src, _pairs(50))
    assert prepare("--output", out, src).returncode == 0
    before = {p: (out / p).read_bytes() if (out / p).is_file() else None for p in _tree(out)}
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in _pairs(60, "v2")]
    lines[55] = "{broken\n"
    _write_rows(src, lines)
    r = prepare("--output", out, "--workers", 2, "--shard-bytes", 500, src)  # fails in a late shard
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(f"{ERROR}{src}:56: malformed JSON")
    assert {p: (out / p).read_bytes() if (out / p).is_file() else None for p in _tree(out)} == before


def test_killed_prepare_leaves_no_dataset_and_the_next_run_cleans_up(tmp_path):
    src, out = tmp_path / "big.jsonl", tmp_path / "out"
    _write_rows(src, [{"text": f"问题{i} " + "字" * 40, "text_pos": "答案" * 60} for i in range(150_000)])
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "scripts", "prepare_data.py"), "--output", str(out),
                             "--workers", "1", str(src)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list(out.glob(".piccolo-tmp-big-*/parts/part-00000.array_record")):  # writing has begun
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    leftovers = [p.name for p in out.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".piccolo-tmp-big-")  # no dataset directory
    r = prepare("--output", out, "--workers", 1, src)
    assert r.returncode == 0, r.stderr
    assert f"WARNING removing {out / leftovers[0]}, left by an interrupted prepare" in r.stderr
    assert "150000 records" in r.stdout and [p.name for p in out.iterdir()] == ["big"]


def test_a_running_prepare_keeps_its_temporary_directory(tmp_path):
    from piccolo_jax.data import staging

    tmp, lock = staging.claim(str(tmp_path), "qa")  # as a running prepare holds it
    staging.remove_stale(str(tmp_path))
    assert os.path.isdir(tmp)
    os.close(lock)  # its process ended
    staging.remove_stale(str(tmp_path))
    assert not os.path.exists(tmp)


def test_bad_paths_exit_2_with_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for target, message in ((tmp_path / "nope.jsonl", "no such dataset file or directory"),
                            (tmp_path / "notes.txt", "unsupported dataset file (expected .jsonl, .parquet, .arrow)"),
                            (tmp_path, ("no data files (.jsonl, .parquet, .arrow) or TFDS / save_to_disk datasets "
                                        "in this directory"))):
        r = prepare("--output", tmp_path / "out", target)
        assert r.returncode == 2 and r.stderr.splitlines()[-1] == f"{ERROR}{target}: {message}"


def test_discovery_case_insensitive_nested_refused_skips_logged(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "zh").mkdir(parents=True)
    _write_rows(data / "Upper.JSONL", _pairs(4))
    _write_rows(data / "lower.jsonl", _pairs(5))
    _write_rows(data / "zh" / "nested.jsonl", _pairs(6))
    (data / "README.md").write_text("# data")
    (data / "notes.txt").write_text("x")
    (data / ".hidden.jsonl").write_text("x")
    os.mkfifo(data / "stream.jsonl")  # neither opened (it would wait for a writer) nor dropped silently
    (data / "loop.jsonl").symlink_to("loop.jsonl")
    r = prepare("--output", out, data)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == (f"{ERROR}{data / 'zh'}: 1 data file(s) in a nested directory "
                                         f"(e.g. nested.jsonl), which are not read; list {data / 'zh'} itself "
                                         f"in the data paths to read them")
    assert not out.exists()
    r = prepare("--output", out, data, data / "zh")  # the nested directory listed itself: read
    assert r.returncode == 0, r.stderr
    for name, n in (("upper", 4), ("lower", 5), ("nested", 6)):
        assert f"{out / name / '1.0.0'}: {n} records" in r.stdout
    not_data = "not a data file (.jsonl, .parquet, .arrow)"
    for skipped, why in (("README.md", not_data), ("notes.txt", not_data), (".hidden.jsonl", "hidden"),
                         ("stream.jsonl", "a named pipe (FIFO), not a regular file"),
                         ("loop.jsonl", "a symbolic link loop")):
        assert f"WARNING skipping {data / skipped}: {why}" in r.stderr
    (out / "stray.txt").write_text("x")  # a TFDS data dir scanned by the loader: the stray file is logged
    r = prepare("--output", tmp_path / "again", out)
    assert r.returncode == 2 and "WARNING skipping" in r.stderr and "already a TFDS dataset" in r.stderr
    assert f"skipping {out / 'stray.txt'}: {not_data}" in r.stderr


def test_skipped_records_report_the_first_five_of_each_file_and_the_rest(tmp_path):
    src = tmp_path / "noisy.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in _pairs(20)]
    for at in (3, 5, 7, 9, 11, 13, 15, 17):
        lines[at] = '{"text": 1, "text_pos": "x"}\n'
    _write_rows(src, lines)
    r = prepare("--output", tmp_path / "out", "--skip-bad-records", src)
    assert r.returncode == 0, r.stderr
    assert "12 records, 8 bad records skipped" in r.stdout
    assert f"WARNING {src}: skipped 8 bad records:" in r.stderr
    for n in (4, 6, 8, 10, 12):
        assert f"WARNING   {src}:{n}: field 'text' must be a string, got int" in r.stderr
    assert f"{src}:14:" not in r.stderr
    assert f"WARNING   ... and 3 more bad records in {src}" in r.stderr
    sources = open_sources([str(tmp_path / "out")])  # the loader reports the same from the dataset
    assert sources[0].bad_records == {str(src): 8} and len(sources[0].bad_messages) == 5


def test_tfds_names():
    assert tfds_store.tfds_name("City-QA v2") == "city_qa_v2"
    assert tfds_store.tfds_name("2024_news") == "ds2024_news"
    assert tfds_store.tfds_name("part_3") == "part3"

"""`piccolo-jax prepare` on Parquet, Arrow (`datasets.Dataset.save_to_disk`) and hub datasets: the same rows
give the same TFDS dataset as from JSONL, record for record and array for array, however the rows are cut
into files, row groups and shards; bad rows are named by file and row; reuse covers files, options and
the column map. In-process (the CLI's main), small data; Parquet conversion caches in a tmp dir.
"""

import json
import os

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from piccolo_jax.commands.prepare_data import main as prepare_main  # noqa: E402
from piccolo_jax.data import record_arrays, tfds_store  # noqa: E402
from piccolo_jax.data.records import Record  # noqa: E402
from piccolo_jax.data.sources import JsonlSource, TfdsSource, open_sources  # noqa: E402

N = 300
HINT = "(pass --skip-bad-records to skip and count such records)"
ERROR = "piccolo-jax prepare: error: "  # how the command starts its one-line errors


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PICCOLO_JAX_CACHE", str(tmp_path / "cache"))  # ArrowSource's Parquet conversion


def prepare(capsys, *args):
    """`piccolo-jax prepare ARGS` in this process: (exit code, stdout, the stderr lines starting ERROR)."""
    rc = prepare_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.startswith(ERROR)]


def _rows(n=N):
    """Pairs and triplets; text_neg absent (a null in a table), an empty list, or 1..3 negatives."""
    rows = []
    for i in range(n):
        row = {"text": f"第{i}个问题" + "长" * (i % 50), "text_pos": f"答案{i}" + "文" * (i * 7 % 400)}
        if i % 3:
            row["text_neg"] = [f"负例{i}-{j}" for j in range(i % 4)]
        rows.append(row)
    return rows


def _table(rows):
    keys = sorted({k for r in rows for k in r})
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _write_shards(directory, name, table, cut, row_group_size=50):
    directory.mkdir(parents=True, exist_ok=True)
    files = [directory / f"{name}-00000-of-00002.parquet", directory / f"{name}-00001-of-00002.parquet"]
    pq.write_table(table.slice(0, cut), files[0], row_group_size=row_group_size)
    pq.write_table(table.slice(cut), files[1], row_group_size=row_group_size)
    return files


def _lines(version_dir):
    """The `line` feature of every record of a prepared dataset."""
    source = TfdsSource(str(version_dir))
    return [tfds_store.example_line(raw) for raw in source._data.read(range(len(source)))]


def test_jsonl_parquet_shards_and_save_to_disk_prepare_alike(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    rows, src, out = _rows(), tmp_path / "src", tmp_path / "out"
    src.mkdir()
    _write_jsonl(src / "pairs.jsonl", rows)
    table = _table(rows)
    pq.write_table(table, src / "pairs_pq.parquet", row_group_size=37)
    assert pq.ParquetFile(src / "pairs_pq.parquet").metadata.num_row_groups == 9
    shards = _write_shards(src / "sh", "pairs_sh", table, 170)
    datasets.Dataset(table).save_to_disk(str(src / "pairs_hf"), num_shards=2)  # two .arrow files
    inputs = [src / "pairs.jsonl", src / "pairs_pq.parquet", src / "sh", src / "pairs_hf"]
    rc, stdout, errors = prepare(capsys, "--output", out, "--workers", 1, "--shard-bytes", 2000, *inputs)
    assert rc == 0, errors
    for name in ("pairs", "pairs_pq", "pairs_sh", "pairs_hf"):
        assert f"{out / name / '1.0.0'}: {N} records, 0 bad records skipped" in stdout
    # cut into many shards by rows (not at row-group or file boundaries), then two worker processes
    assert sum(".array_record-" in f for f in os.listdir(out / "pairs_pq" / "1.0.0")) > 5
    rc, _, errors = prepare(capsys, "--output", tmp_path / "two", "--workers", 2, "--shard-bytes", 3000, src / "sh")
    assert rc == 0, errors

    dirs = [out / n / "1.0.0" for n in ("pairs", "pairs_pq", "pairs_sh", "pairs_hf")] + \
        [tmp_path / "two" / "pairs_sh" / "1.0.0"]
    prepared = [TfdsSource(str(d)) for d in dirs]
    jsonl = JsonlSource(str(src / "pairs.jsonl"))
    arrow = open_sources([str(src / "pairs_pq.parquet"), str(src / "pairs_hf")])
    expected = jsonl.records(range(N))
    assert expected[1].negatives == ("负例1-0",) and expected[4].negatives == () and expected[3].negatives == ()
    for source in [*prepared, *arrow]:
        assert source.records(range(N)) == expected, source.path
    for name in record_arrays.ARRAY_NAMES:
        for source in [*prepared, *arrow]:
            values, reference = getattr(source, name), getattr(jsonl, name)
            assert np.array_equal(values, reference) and values.dtype == reference.dtype, (source.path, name)
    for d in dirs:  # JSONL line n, table row n: the same numbers here
        assert _lines(d) == list(range(1, N + 1))
    origin = tfds_store.open_dataset(str(out / "pairs_sh" / "1.0.0")).origin
    assert [origin.where(n) for n in (1, 170, 171, 300)] == [
        f"{shards[0]} row 1", f"{shards[0]} row 170", f"{shards[1]} row 1", f"{shards[1]} row 130"]
    assert tfds_store.open_dataset(str(out / "pairs" / "1.0.0")).origin.where(7) == f"{src / 'pairs.jsonl'}:7"


def test_bad_rows_are_named_by_file_and_row(tmp_path, capsys):
    rows = _rows()
    rows[4]["text_pos"] = None  # a null: an absent key
    rows[170 + 56]["text_pos"] = "   "
    files = _write_shards(tmp_path / "src", "noisy", _table(rows), 170, row_group_size=23)
    out = tmp_path / "out"
    rc, stdout, errors = prepare(capsys, "--output", out, "--workers", 1, "--shard-bytes", 1500, tmp_path / "src")
    assert rc == 2 and errors == [f"{ERROR}{files[0]} row 5: missing field 'text_pos' {HINT}"]
    assert not os.path.exists(out / "noisy")
    rows[4]["text_pos"] = "答案4"
    _write_shards(tmp_path / "src", "noisy", _table(rows), 170, row_group_size=23)
    rc, stdout, errors = prepare(capsys, "--output", out, "--workers", 1, "--shard-bytes", 1500, tmp_path / "src")
    assert rc == 2 and errors == [f"{ERROR}{files[1]} row 57: field 'text_pos' is empty {HINT}"]
    rc, stdout, errors = prepare(capsys, "--output", out, "--workers", 1, "--shard-bytes", 1500,
                                 "--skip-bad-records", tmp_path / "src")
    assert rc == 0 and f"{N - 1} records, 1 bad records skipped" in stdout
    source = TfdsSource(str(out / "noisy" / "1.0.0"))
    assert source.bad_messages == [f"{files[1]} row 57: field 'text_pos' is empty"]
    good = [r for i, r in enumerate(rows) if i != 226]
    jsonl = tmp_path / "good.jsonl"
    _write_jsonl(jsonl, good)
    assert source.records(range(N - 1)) == JsonlSource(str(jsonl)).records(range(N - 1))
    origin = tfds_store.open_dataset(str(out / "noisy" / "1.0.0")).origin
    assert [origin.where(n) for n in _lines(out / "noisy" / "1.0.0")[225:227]] == [
        f"{files[1]} row 56", f"{files[1]} row 58"]


def test_second_run_reuses_and_a_change_rebuilds(tmp_path, capsys):
    src, out = tmp_path / "qa.parquet", tmp_path / "out"
    pq.write_table(_table(_rows()), src, row_group_size=64)
    run = lambda *args: prepare(capsys, "--output", out, "--workers", 1, *args, src)  # noqa: E731
    rc, stdout, _ = run()
    assert rc == 0 and f"{src} -> {out / 'qa' / '1.0.0'}: {N} records" in stdout
    rc, stdout, _ = run()
    assert rc == 0 and f"reused (input unchanged: {N} rows, sha256" in stdout and "converted" not in stdout
    os.utime(src, ns=(1, 1))
    rc, stdout, _ = run()
    assert f"reused (input unchanged: {N} rows, sha256" in stdout and f"only the modification time of {src}" in stdout
    rc, stdout, _ = run("--columns", "text=text,text_pos=text_pos")
    assert ("rebuilt (options changed: columns None -> {'text': 'text', 'text_pos': 'text_pos'})"
            f": {N} records") in stdout
    rc, stdout, _ = run("--columns", "text=text,text_pos=text_pos")
    assert "reused (input unchanged" in stdout
    rc, stdout, _ = run("--columns", "text=text_pos,text_pos=text")  # another map: another dataset
    assert "rebuilt (options changed: columns" in stdout
    assert TfdsSource(str(out / "qa" / "1.0.0")).records([0])[0].query == _rows()[0]["text_pos"]
    rc, stdout, _ = run()
    assert "rebuilt (options changed: columns {'text': 'text_pos', 'text_pos': 'text'} -> None)" in stdout
    rc, stdout, _ = run("--record-format", "uniem")
    assert "rebuilt (options changed: record_format 'auto' -> 'uniem')" in stdout
    pq.write_table(_table(_rows(40)), src, row_group_size=64)
    rc, stdout, _ = run("--record-format", "uniem")
    assert f"rebuilt (input changed: {N} -> 40 rows; {src}: " in stdout and ": 40 records" in stdout


def test_unknown_columns_refused_in_one_line_and_mapped_with_columns(tmp_path, capsys):
    faq = [{"id": i, "question": f"问题{i}", "answer": f"答案{i}"} for i in range(30)]
    src, out = tmp_path / "faq.parquet", tmp_path / "out"
    pq.write_table(pa.Table.from_pylist(faq), src, row_group_size=8)
    _write_jsonl(tmp_path / "faq_lines.jsonl", faq)
    for skip in ((), ("--skip-bad-records",)):
        rc, stdout, errors = prepare(capsys, "--output", out, "--workers", 1, *skip, src)
        assert rc == 2 and len(errors) == 1
        assert errors[0].startswith(f"{ERROR}{src} row 1: no known columns among ['answer', 'id', 'question']")
        assert errors[0].endswith("; map your columns to ours: --columns text=QUERY_COLUMN,text_pos=PASSAGE_COLUMN")
        assert "skip" not in errors[0]
    assert not os.path.exists(out / "faq")
    rc, stdout, errors = prepare(capsys, "--output", out, "--workers", 1, "--columns",
                                 "text=question, text_pos=answer", src, tmp_path / "faq_lines.jsonl")
    assert rc == 0, errors
    expected = [Record(f"问题{i}", (f"答案{i}",)) for i in range(30)]
    assert TfdsSource(str(out / "faq" / "1.0.0")).records(range(30)) == expected
    assert TfdsSource(str(out / "faq_lines" / "1.0.0")).records(range(30)) == expected  # JSONL too
    for bad, message in (("text=question,answer", "expected KEY=COLUMN[,KEY=COLUMN...]"),
                         ("text=question,passage=answer", "'passage' is not a record key; expected one of ["),
                         ("text=question,text=answer", "'text' is mapped twice")):
        rc, _, errors = prepare(capsys, "--output", out, "--columns", bad, src)
        assert rc == 2 and len(errors) == 1 and message in errors[0]


def test_hub_datasets_prepare_from_the_local_cache(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    from hf_cache import lay_dataset

    hub, files = tmp_path / "hub", tmp_path / "files"
    rows = _rows(120)
    halves = _write_shards(files, "train", _table(rows), 50, row_group_size=16)
    (files / "README.md").write_text("# pairs")
    _write_jsonl(files / "notes.jsonl", rows[:20])
    lay_dataset(hub, "acme/pairs", {"data/train-00000-of-00002.parquet": halves[0],
                                    "data/train-00001-of-00002.parquet": halves[1], "README.md": files / "README.md"})
    lay_dataset(hub, "acme/notes", {"train.jsonl": files / "notes.jsonl"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    args = ("--output", out, "--workers", 1, "--shard-bytes", 1000, "hf://datasets/acme/pairs",
            "hf://datasets/acme/notes")
    rc, stdout, errors = prepare(capsys, *args)
    assert rc == 0, errors
    assert f"hf://datasets/acme/pairs -> {out / 'pairs' / '1.0.0'}: 120 records" in stdout
    assert f"hf://datasets/acme/notes -> {out / 'notes' / '1.0.0'}: 20 records" in stdout
    jsonl = tmp_path / "rows.jsonl"
    _write_jsonl(jsonl, rows)
    expected = JsonlSource(str(jsonl)).records(range(120))
    assert TfdsSource(str(out / "pairs" / "1.0.0")).records(range(120)) == expected
    assert TfdsSource(str(out / "notes" / "1.0.0")).records(range(20)) == expected[:20]
    meta = tfds_store.read_source_file(str(out / "pairs" / "1.0.0"))
    assert [f["sha256"].split(":")[0] for f in meta["fingerprint"]["inputs"]] == ["hub-blob", "hub-blob"]
    origin = tfds_store.open_dataset(str(out / "pairs" / "1.0.0")).origin
    assert origin.where(51).endswith("data/train-00001-of-00002.parquet row 1")
    rc, stdout, errors = prepare(capsys, *args)
    assert stdout.count("reused (input unchanged") == 2 and "converted" not in stdout

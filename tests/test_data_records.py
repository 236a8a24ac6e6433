"""Record formats and bad input: errors name file and line; skipped records are counted and reported."""

import json
import os
import re

import numpy as np
import pytest
from helpers import bad_record_counts, record_to_json

from piccolo_jax.config import DataConfig
from piccolo_jax.data.loader import make_loader
from piccolo_jax.data.records import BadRecord, Record, parse_line, record_from_json
from piccolo_jax.data.sources import JsonlSource, open_sources
from piccolo_jax.text.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def test_uniem_pairs_and_triplets():
    assert parse_line(_line({"text": "问", "text_pos": "答"})) == Record("问", ("答",))
    assert parse_line(_line({"text": "问", "text_pos": "答", "text_neg": "错"})) == Record("问", ("答",), ("错",))
    assert parse_line(_line({"text": "问", "text_pos": "答", "text_neg": ["错1", "错2"]})) == \
        Record("问", ("答",), ("错1", "错2"))


def test_bge_records():
    obj = {"query": "q", "pos": ["p1", "p2"], "neg": ["n1"], "prompt": "为这个句子生成表示：", "type": "normal"}
    assert parse_line(_line(obj)) == Record("q", ("p1", "p2"), ("n1",), "为这个句子生成表示：")
    assert parse_line(_line({"query": "q", "pos": ["p"]})) == Record("q", ("p",))
    assert parse_line(_line({"query": "q", "pos": ["p"], "prompt": ""})).prompt is None


def test_declared_format_is_enforced():
    with pytest.raises(BadRecord, match="missing field 'text'"):
        parse_line(_line({"query": "q", "pos": ["p"]}), "uniem")
    assert parse_line(_line({"query": "q", "pos": ["p"]}), "bge") == Record("q", ("p",))


def test_original_formats_parse_as_before():
    """uniem and BGE records: the Record of before, every field added since at its default."""
    cases = [
        ({"text": "问", "text_pos": "答"}, Record("问", ("答",)), {"query": "问", "pos": ["答"], "neg": []}),
        ({"text": "问", "text_pos": "答", "text_neg": ["错"], "type": "retri_contrast"}, Record("问", ("答",), ("错",)),
         {"query": "问", "pos": ["答"], "neg": ["错"]}),
        ({"query": "q", "pos": ["p"], "neg": ["n"], "prompt": "指令", "type": "symmetric_class"},
         Record("q", ("p",), ("n",), "指令"), {"query": "q", "pos": ["p"], "neg": ["n"], "prompt": "指令"}),
    ]
    for obj, want, as_json in cases:
        got = parse_line(_line(obj))
        assert got == want and record_to_json(got) == as_json
        assert (got.task, got.label, got.positive_scores, got.negative_scores) == ("retrieval", None, None, None)


def test_scored_pairs():
    uniem = parse_line(_line({"sentence1": "今天天气好", "sentence2": "天气不错", "label": 3}))
    assert uniem == Record("今天天气好", ("天气不错",), task="sts", label=3.0) and type(uniem.label) is float
    piccolo = parse_line(_line({"text": "a", "text_pair": "b", "label": 0.25, "type": "cosent"}))
    assert piccolo == Record("a", ("b",), task="sts", label=0.25)
    assert parse_line(_line({"text": "a", "text_pair": "b", "label": -1}), "scored_pair").label == -1.0
    with pytest.raises(BadRecord, match="missing field 'text_pair'"):
        parse_line(_line({"text": "a", "text_pos": "b"}), "scored_pair")


def test_classification_triplets():
    obj = {"text": "这部电影太好看了", "text_pos": "正面", "text_neg": ["负面"], "type": "cls_contrast"}
    want = Record("这部电影太好看了", ("正面",), ("负面",), task="classification")
    assert parse_line(_line(obj)) == want
    untyped = {k: v for k, v in obj.items() if k != "type"}
    assert parse_line(_line(untyped)).task == "retrieval"  # auto without `type`: a uniem triplet
    assert parse_line(_line(untyped), "classification") == want
    many = {"text": "t", "text_pos": ["体育", "足球"], "text_neg": "财经"}
    assert parse_line(_line(many), "classification") == Record("t", ("体育", "足球"), ("财经",), task="classification")


def test_declared_format_and_piccolo_type_must_agree():
    row = {"text": "a", "text_pos": "b", "text_neg": ["c"]}
    with pytest.raises(BadRecord, match=r"field 'type' is 'retri_contrast' \(retrieval\), but the record is read "
                                        r"as 'classification' \(classification\)"):
        parse_line(_line({**row, "type": "retri_contrast"}), "classification")
    with pytest.raises(BadRecord, match=r"'cls_contrast' \(classification\), but the record is read as 'uniem'"):
        parse_line(_line({**row, "type": "cls_contrast"}), "uniem")
    with pytest.raises(BadRecord, match=r"'cosent' \(sts\), but the record is read as 'classification'"):
        parse_line(_line({**row, "type": "cosent"}), "classification")
    with pytest.raises(ValueError, match="unknown record format 'sts'"):
        parse_line(_line(row), "sts")


def test_teacher_scores():
    obj = {"query": "q", "pos": ["p1", "p2"], "neg": ["n1"], "pos_scores": [1, 0.5], "neg_scores": [-2.5]}
    assert parse_line(_line(obj)) == Record("q", ("p1", "p2"), ("n1",), positive_scores=(1.0, 0.5),
                                            negative_scores=(-2.5,))
    assert parse_line(_line({"query": "q", "pos": ["p"], "pos_scores": [0.75]})).negative_scores == ()
    assert parse_line(_line({"query": "q", "pos": ["p"], "neg": [], "pos_scores": [0.75], "neg_scores": []})) == \
        Record("q", ("p",), positive_scores=(0.75,), negative_scores=())
    # Teacher scores are kept at float32 precision (what the loss and the TFDS store use).
    assert parse_line(_line({"query": "q", "pos": ["p"], "pos_scores": [0.9]})).positive_scores == \
        (float(np.float32(0.9)),)


def test_record_to_json_round_trips_every_kind():
    records = [
        Record("问", ("答",)),
        Record("q", ("p1", "p2"), ("n1", "n2"), "为这个句子生成表示："),
        Record("q", ("p",), ("n1", "n2"), positive_scores=(0.125,), negative_scores=(2.0 ** -23, -3.25)),
        Record("q", ("p",), positive_scores=(2.0,), negative_scores=()),
        Record("今天天气好", ("天气不错",), task="sts", label=float(np.float32(0.1))),  # float32 from parsing on
        Record("a", ("b",), task="sts", label=-4.0),
        Record("电影", ("正面",), ("负面",), task="classification"),
        Record("t", ("体育", "足球"), ("财经", "科技"), task="classification"),
    ]
    for record in records:
        obj = record_to_json(record)
        assert record_from_json(json.loads(json.dumps(obj, ensure_ascii=False))) == record, obj
        assert parse_line(_line(obj)) == record


BAD_LINES = {
    "malformed_json": (b'{"text": "a", "text_pos": ', "malformed JSON"),
    "not_an_object": (b'["a", "b"]', "expected a JSON object, got list"),
    "unknown_format": (_line({"question": "a", "answer": "b"}),
                       r"no known columns among \['answer', 'question'\] \(known: text / text_pos"),
    "ambiguous": (_line({"text": "a", "text_pos": "b", "query": "c"}), "ambiguous record"),
    "missing_pos": (_line({"text": "a"}), "missing field 'text_pos'"),
    "empty_query": (_line({"text": "  ", "text_pos": "b"}), "field 'text' is empty"),
    "int_text": (_line({"text": 3, "text_pos": "b"}), "field 'text' must be a string, got int"),
    "null_pos": (_line({"text": "a", "text_pos": None}), "field 'text_pos' must be a string, got NoneType"),
    "neg_not_text": (_line({"text": "a", "text_pos": "b", "text_neg": ["c", 5]}),
                     r"field 'text_neg'\[1\] must be a string, got int"),
    "neg_empty_string": (_line({"text": "a", "text_pos": "b", "text_neg": ""}), r"field 'text_neg'\[0\] is empty"),
    "bge_pos_string": (_line({"query": "a", "pos": "b"}), "field 'pos' must be a list of strings, got str"),
    "bge_pos_empty": (_line({"query": "a", "pos": []}), "field 'pos' is an empty list"),
    "bge_prompt_int": (_line({"query": "a", "pos": ["b"], "prompt": 1}), "field 'prompt' must be a string"),
    "invalid_utf8": (b'{"text": "\xe4\xb8", "text_pos": "b"}', "invalid UTF-8 at byte 10"),
    "lone_surrogate": (b'{"text": "a\\ud800", "text_pos": "b"}', r"invalid unicode \(lone surrogate \\ud800\)"),
    "empty_line": (b"   ", "empty line"),
    "long_line": (_line({"text": "长" * 200, "text_pos": "b"}), r"line is 6\d\d bytes, over max_record_bytes=256"),
    # scored pairs
    "label_string": (_line({"sentence1": "a", "sentence2": "b", "label": "0.5"}),
                     "field 'label' must be a number, got str"),
    "label_bool": (_line({"text": "a", "text_pair": "b", "label": True}), "field 'label' must be a number, got bool"),
    "label_nan": (b'{"text": "a", "text_pair": "b", "label": NaN}', "field 'label' must be a finite number, got nan"),
    "label_overflow": (b'{"text": "a", "text_pair": "b", "label": 1e400}', "field 'label' must be a finite number"),
    "label_missing": (_line({"sentence1": "a", "sentence2": "b"}), "missing field 'label'"),
    "sentence2_missing": (_line({"sentence1": "a", "label": 1}), "missing field 'sentence2'"),
    "pair_and_pos": (_line({"text": "a", "text_pos": "b", "text_pair": "c", "label": 1}),
                     r"ambiguous record: has both 'text_pos' \(triplet\) and 'text_pair' \(scored pair\)"),
    "sentence1_and_text": (_line({"sentence1": "a", "sentence2": "b", "text": "c", "label": 1}),
                           r"ambiguous record: has both 'sentence1' \(uniem\) and 'text' \(piccolo v2\)"),
    "cosent_without_pair": (_line({"text": "a", "text_pos": "b", "type": "cosent"}), "missing field 'text_pair'"),
    # classification triplets
    "cls_no_negatives": (_line({"text": "a", "text_pos": "b", "text_neg": [], "type": "cls_contrast"}),
                         "field 'text_neg' is empty: a classification record needs at least one negative"),
    "cls_missing_negatives": (_line({"text": "a", "text_pos": "b", "type": "cls_contrast"}),
                              "missing field 'text_neg'"),
    "unknown_type": (_line({"text": "a", "text_pos": "b", "type": "cls-contrast"}),
                     r"field 'type' must be one of \['cls_contrast', 'cosent', 'retri_contrast'\] \(piccolo v2\), "
                     "got 'cls-contrast'"),
    # teacher scores
    "scores_short": (_line({"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "pos_scores": [1.0], "neg_scores": [0.5]}),
                     r"field 'neg_scores' has 1 scores for 2 passages in 'neg' \(one score per passage\)"),
    "scores_long": (_line({"query": "q", "pos": ["p"], "pos_scores": [1.0, 2.0]}),
                    "field 'pos_scores' has 2 scores for 1 passages in 'pos'"),
    "score_string": (_line({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1], "neg_scores": ["x"]}),
                     r"field 'neg_scores'\[0\] must be a number, got str"),
    "score_null": (_line({"query": "q", "pos": ["p"], "pos_scores": [None]}),
                   r"field 'pos_scores'\[0\] must be a number, got NoneType"),
    "score_not_list": (_line({"query": "q", "pos": ["p"], "pos_scores": 1.0}),
                       "field 'pos_scores' must be a list of numbers, got float"),
    "score_infinite": (b'{"query": "q", "pos": ["p"], "pos_scores": [-Infinity]}',
                       r"field 'pos_scores'\[0\] must be a finite number, got -inf"),
    "neg_scores_missing": (_line({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1]}),
                           "field 'pos_scores' without 'neg_scores': teacher scores need one per passage, and 'neg' has 1"),
    "pos_scores_missing": (_line({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [1]}),
                           "field 'neg_scores' without 'pos_scores'"),
}


def _write(tmp_path, bad: bytes, name="data.jsonl"):
    path = tmp_path / name
    good = [_line({"text": f"问题{i}", "text_pos": f"答案{i}"}) for i in range(3)]
    path.write_bytes(b"\n".join([good[0], bad, good[1], good[2]]) + b"\n")
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_stops_with_file_and_line(tmp_path, case):
    raw, reason = BAD_LINES[case]
    path = _write(tmp_path, raw)
    with pytest.raises(BadRecord, match=re.escape(f"{path}:2: ") + reason) as info:
        JsonlSource(path, max_record_bytes=256)
    assert str(info.value).endswith("(set data.skip_bad_records = true to skip and count such records)")


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_skipped_and_counted(tmp_path, case):
    raw, reason = BAD_LINES[case]
    path = _write(tmp_path, raw)
    source = JsonlSource(path, skip_bad_records=True, max_record_bytes=256)
    assert len(source) == 3 and source.bad_records == {path: 1}
    assert [r.query for r in source.records([0, 1, 2])] == ["问题0", "问题1", "问题2"]
    assert source.line_numbers.tolist() == [1, 3, 4]
    assert source.bad_messages[0].startswith(f"{path}:2: ")


def test_loader_reports_bad_records_per_file(tmp_path, caplog):
    bad = _write(tmp_path, BAD_LINES["malformed_json"][0], "bad.jsonl")
    worse = tmp_path / "worse.jsonl"
    worse.write_bytes(open(bad, "rb").read() + b"{oops\n[1]\n")
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"text": f"q{i}", "text_pos": f"p{i}"}) + "\n" for i in range(4)))
    tokenizer = Tokenizer.from_dir(os.path.join(REPO, "assets", "tokenizer"))
    cfg = DataConfig(paths=(str(tmp_path),), global_batch_size=2, skip_bad_records=True, num_workers=0)
    with caplog.at_level("INFO"):
        loader = make_loader(cfg, tokenizer)
    assert bad_record_counts(loader) == {bad: 1, str(clean): 0, str(worse): 3}
    metrics = loader.metrics()
    assert metrics["data/bad_records/bad"] == 1 and metrics["data/bad_records/worse"] == 3
    assert metrics["data/bad_records_total"] == 4
    assert f"{worse}:2: malformed JSON" in caplog.text
    assert any(line.startswith("dataset worse:") and "3 bad records skipped" in line
               for line in loader.summary_lines())
    assert loader.report()["worse"]["bad_examples"][1].startswith(f"{worse}:5: malformed JSON")
    with pytest.raises(BadRecord, match=re.escape(f"{bad}:2: malformed JSON")):
        make_loader(DataConfig(paths=(str(tmp_path),), global_batch_size=2), tokenizer)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dataset"):
        open_sources([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported dataset file"):
        open_sources([str(tmp_path / "x.txt")])
    with pytest.raises(ValueError, match=r"no data files \(.jsonl, .parquet, .arrow\) or TFDS / save_to_disk datasets"):
        open_sources([str(tmp_path)])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "same.jsonl").write_text(json.dumps({"text": "q", "text_pos": "p"}) + "\n")
    with pytest.raises(ValueError, match="dataset name 'same' is used by both"):
        open_sources([str(tmp_path / "a"), str(tmp_path / "b")])


def test_absurdly_long_line_is_not_read_into_a_record(tmp_path):
    path = tmp_path / "huge.jsonl"
    huge = _line({"text": "x" * (3 << 20), "text_pos": "b"})  # 3 MiB, over the 1 MiB default
    path.write_bytes(b"\n".join([_line({"text": "a", "text_pos": "b"}), huge, _line({"text": "c", "text_pos": "d"})]))
    with pytest.raises(BadRecord, match=re.escape(f"{path}:2: line is {len(huge) + 1:,} bytes")):
        JsonlSource(str(path))
    source = JsonlSource(str(path), skip_bad_records=True)
    assert [r.query for r in source.records([0, 1])] == ["a", "c"] and source.line_numbers.tolist() == [1, 3]


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    bom = b"\xef\xbb\xbf"
    path.write_bytes(bom + _line({"text": "a", "text_pos": "b"}) + b"\r\n" + _line({"query": "c", "pos": ["d"]}))
    source = JsonlSource(str(path))
    assert source.records([0, 1]) == [Record("a", ("b",)), Record("c", ("d",))]


def test_discovery_for_the_loader(tmp_path, caplog):
    """JSONL by case-insensitive suffix; nested JSONL refused with one line; every skipped file logged."""
    row = json.dumps({"text": "q", "text_pos": "p"}) + "\n"
    (tmp_path / "Upper.JSONL").write_text(row)
    (tmp_path / "lower.jsonl").write_text(row)
    (tmp_path / "README.md").write_text("# data")
    (tmp_path / ".DS_Store").write_text("")
    (tmp_path / "empty").mkdir()
    with caplog.at_level("INFO"):
        sources = open_sources([str(tmp_path)])
    assert [s.name for s in sources] == ["Upper", "lower"]
    for skipped, why in (("README.md", "not a data file (.jsonl, .parquet, .arrow)"), (".DS_Store", "hidden"), ("empty", "empty directory")):
        assert f"skipping {tmp_path / skipped}: {why}" in caplog.text
    (tmp_path / "deep" / "zh").mkdir(parents=True)
    (tmp_path / "deep" / "zh" / "news.jsonl").write_text(row)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'deep' / 'zh'}: 1 data file(s) in a nested "
                                                   f"directory (e.g. news.jsonl), which are not read")):
        open_sources([str(tmp_path)])
    names = [s.name for s in open_sources([str(tmp_path), str(tmp_path / "deep" / "zh")])]
    assert names == ["Upper", "lower", "news"]


def test_skipped_records_log_the_first_five_and_the_count_of_the_rest(tmp_path, caplog):
    path = tmp_path / "noisy.jsonl"
    lines = [json.dumps({"text": f"q{i}", "text_pos": "p"}) if i % 2 else "{bad" for i in range(20)]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        source = JsonlSource(str(path), skip_bad_records=True)
    assert len(source) == 10 and source.bad_records == {str(path): 10}
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"{path}: skipped 10 bad records:"
    assert [m.split(": ")[0] for m in messages[1:6]] == [f"  {path}:{n}" for n in (1, 3, 5, 7, 9)]
    assert messages[6:] == [f"  ... and 5 more bad records in {path}"]

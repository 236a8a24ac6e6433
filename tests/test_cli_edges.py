"""encode / evaluate / mine as a user runs them: run directories as --model, one-line errors with exit 2 for
bad models and bad inputs, a JSONL input without --field refused, labelled progress bars. A tiny random
BERT keeps every run short."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from trainer_cli import xla_flags

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "assets" / "tokenizer"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(HF directory, run directory with export/model, run directory without an export)."""
    transformers = pytest.importorskip("transformers")
    import shutil

    from piccolo_jax.hf import load_hf_model
    from piccolo_jax.model.directory import save_model_dir

    root = tmp_path_factory.mktemp("models")
    hf = root / "tiny-hf"
    cfg = transformers.BertConfig(vocab_size=21128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(hf)
    for f in TOKENIZER.iterdir():
        shutil.copy2(f, hf / f.name)
    run = root / "run"
    our_cfg, params, _ = load_hf_model(hf)
    save_model_dir(run / "export" / "model", our_cfg, params, side_files_from=str(hf))
    (run / "export" / "export.json").write_text('{"step": 20}\n')  # what marks a run's export complete
    (run / "checkpoints" / "20").mkdir(parents=True)
    (run / "config.json").write_text("{}\n")
    unfinished = root / "unfinished"
    (unfinished / "checkpoints" / "10").mkdir(parents=True)
    (unfinished / "config.json").write_text("{}\n")
    (unfinished / "train.log").write_text("")
    return hf, run, unfinished


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "piccolo_jax", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, check=False, env={**os.environ, "XLA_FLAGS": xla_flags()})


def assert_one_line_error(run, *fragments):
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_encode_refuses_jsonl_without_field(tmp_path, models):
    hf, _, _ = models
    for name in ("corpus.jsonl", "CORPUS.JSONL"):
        src = tmp_path / name
        src.write_text('\n{"_id": "a", "body": "文本", "lang": "zh"}\n', encoding="utf-8")
        run = cli("encode", "--model", hf, "--input", src, "--output", tmp_path / "x.npy")
        assert_one_line_error(run, str(src), "--field", "line 2", "_id, body, lang")
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".x*"))


def test_run_directory_as_model(tmp_path, models):
    hf, run_dir, _ = models
    src = tmp_path / "texts.txt"
    src.write_text("北京是中国的首都\nhello world\n熊猫吃竹子\n", encoding="utf-8")
    outs = {}
    for label, model in (("hf", hf), ("run", run_dir)):
        outs[label] = tmp_path / f"{label}.npy"
        run = cli("encode", "--model", model, "--input", src, "--output", outs[label], "--no-progress")
        assert run.returncode == 0, run.stderr
    np.testing.assert_allclose(np.load(outs["run"]), np.load(outs["hf"]), atol=1e-6)  # the run's export
    run = cli("evaluate", "--model", run_dir, REPO / "assets" / "eval" / "sts.jsonl")
    assert run.returncode == 0 and "cos_spearman" in run.stdout, run.stderr


def test_run_directory_without_export_and_missing_model(tmp_path, models):
    _, _, unfinished = models
    src = tmp_path / "texts.txt"
    src.write_text("一\n二\n", encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"text": "q", "text_pos": "p"}\n', encoding="utf-8")
    commands = {"encode": ["--input", src, "--output", tmp_path / "x.npy"],
                "evaluate": [REPO / "assets" / "eval" / "sts.jsonl"],
                "mine": ["--input", pairs, "--output", tmp_path / "x.jsonl", "--window", "0", "1"]}
    for command, rest in commands.items():
        assert_one_line_error(cli(command, "--model", unfinished, *rest), str(unfinished), "without an export")
        assert_one_line_error(cli(command, "--model", tmp_path / "nowhere", *rest), "nowhere",
                              "no such model directory")
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.jsonl").exists()


def test_bad_and_empty_inputs_are_one_line_errors(tmp_path, models):
    hf, _, _ = models
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    assert_one_line_error(cli("encode", "--model", hf, "--input", bad, "--field", "text", "--output",
                              tmp_path / "x.npy"), "bad.jsonl:2", "malformed JSON")
    assert_one_line_error(cli("encode", "--model", hf, "--input", empty, "--field", "text", "--output",
                              tmp_path / "x.npy"), "empty.jsonl", "no texts")
    sts = tmp_path / "sts.jsonl"
    sts.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", "score": 2}\n')
    assert_one_line_error(cli("evaluate", "--model", hf, sts), "sts.jsonl:2", "sentence2")
    assert_one_line_error(cli("evaluate", "--model", hf, empty), "empty.jsonl", "empty file")
    bad_pairs = tmp_path / "bad_pairs.jsonl"
    bad_pairs.write_text('{"text": "q", "text_pos": "p"}\n{"text": "q"}\n', encoding="utf-8")
    assert_one_line_error(cli("mine", "--model", hf, "--input", bad_pairs, "--output", tmp_path / "m.jsonl"),
                          "bad_pairs.jsonl:2", "text_pos")
    assert_one_line_error(cli("mine", "--model", hf, "--input", empty, "--output", tmp_path / "m.jsonl"),
                          "empty.jsonl", "no records")
    assert_one_line_error(cli("evaluate", "--model", hf), "nothing to evaluate")  # argparse errors too
    assert not list(tmp_path.glob("x.npy")) and not list(tmp_path.glob("m.jsonl")) and not list(tmp_path.glob(".*"))


def test_mine_labels_its_two_progress_bars(tmp_path, models):
    hf, run_dir, _ = models
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"text": f"问题{i}", "text_pos": f"答案{i}"}, ensure_ascii=False) + "\n"
                             for i in range(6)), encoding="utf-8")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"p": f"段落{i}"}, ensure_ascii=False) + "\n" for i in range(12)),
                      encoding="utf-8")
    out = tmp_path / "mined.jsonl"
    assert_one_line_error(cli("mine", "--model", run_dir, "--input", pairs, "--corpus", corpus, "--output", out),
                          "--corpus-field", "p")
    run = cli("mine", "--model", run_dir, "--input", pairs, "--corpus", corpus, "--corpus-field", "p",
              "--output", out, "--window", "1", "5", "--num-negatives", "2")
    assert run.returncode == 0, run.stderr
    assert "encode queries" in run.stderr and "encode corpus" in run.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == 6


def _help(capsys, *argv) -> str:
    from piccolo_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone


def test_help_names_every_bundled_config_run_directories_and_the_installed_command(capsys):
    bundled = sorted(p.stem for p in (REPO / "configs").glob("*.toml"))
    assert {"tiny", "pretrain", "finetune", "tiny_v2", "finetune_v2"} <= set(bundled)
    text = _help(capsys, "train")
    listed = text.split("a bundled one by name: ", 1)[1].split(" --workdir", 1)[0]
    assert listed.split(", ") == ["tiny (default", "CPU)"] + [n for n in bundled if n != "tiny"], listed
    for command in ("encode", "mine", "evaluate"):
        model = _help(capsys, command).split("--model MODEL ", 2)[2]  # the option's help, not the usage line
        assert model.startswith("training run directory (e.g. runs/finetune: its export/model)"), (command, model)
        assert "hub id ORG/NAME[@REVISION]" in model.split(" --", 1)[0], (command, model)
    text = _help(capsys, "convert")
    assert "piccolo-jax convert hf2jax HF_DIR OUT_DIR" in text and "piccolo-jax convert jax2hf MODEL_DIR" in text
    assert "python conversion/convert.py hf2jax" not in text and "python conversion/convert.py jax2hf" not in text


def test_prepare_without_its_extra_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from piccolo_jax.cli import main

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed: import fails
    assert main(["prepare", "--output", str(tmp_path / "tfds"), str(REPO / "assets" / "data" / "finetune")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("piccolo-jax prepare: error: prepare needs tensorflow-datasets and array-record"), err
    assert err[0].endswith(": pip install 'piccolo-jax[tfds]'"), err
    assert not (tmp_path / "tfds").exists()


def test_mine_refuses_an_existing_output_without_overwrite(tmp_path, capsys):
    """As `convert` refuses an existing output directory: one line, exit 2, before any model loads (the
    model named here does not exist), the file as it was. --overwrite: test_mining.test_mine_negatives_cli."""
    from piccolo_jax.cli import main

    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "finetune.jsonl"
    pairs.write_text('{"text": "q", "text_pos": "p"}\n')
    out.write_text("mine\n")
    assert main(["mine", "--model", str(tmp_path / "no-model"), "--input", str(pairs), "--output", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"piccolo-jax mine: error: {out} exists (pass --overwrite to replace it)"]
    assert out.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["finetune.jsonl",
                                                                                          "pairs.jsonl"]


def test_every_command_prefixes_its_errors_with_its_name(tmp_path, capsys):
    """`piccolo-jax COMMAND: error: ...`, one line, exit 2, whether argparse, the config or the input refuses
    (argparse's own usage errors print `PROG: error:`; ours match them); `scripts/*.py` run the same main."""
    from piccolo_jax.cli import main

    def refused(*argv) -> str:
        try:
            code = main(list(map(str, argv)))
        except SystemExit as e:  # argparse
            code = e.code
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1, (argv, code, err)
        return err[0]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": \n', encoding="utf-8")
    cases = {
        "train": [("--stage", "pretrian"), ("--stage", "pretrain", "--print-config", "--set", "optim.lrr=1"),
                  ("--stage", "pretrain", "--config", tmp_path / "none.toml")],
        "encode": [("--model", "m", "--output", "o.npy"),
                   ("--model", tmp_path / "nowhere", "--input", bad, "--output", tmp_path / "o.npy")],
        "evaluate": [("--model", "m", "--frobnicate")],
        "mine": [("--model", "m",)],
        "convert": [("sideways", "a", "b")],
        "prepare": [("--output", tmp_path / "out", "--record-format", "nope", "in.jsonl"),
                    ("--output", tmp_path / "out", "--columns", "passage=answer", "in.parquet")],
    }
    for command, argvs in cases.items():
        for argv in argvs:
            line = refused(command, *argv)
            assert line.startswith(f"piccolo-jax {command}: error: "), line
    line = refused("convert", "hf2jax", tmp_path / "nowhere", tmp_path / "out")  # the subcommand's own prog
    assert line.startswith("piccolo-jax convert hf2jax: error: "), line
    assert main(["frobnicate"]) == 2
    assert capsys.readouterr().err.startswith("piccolo-jax: error: unknown command 'frobnicate'")

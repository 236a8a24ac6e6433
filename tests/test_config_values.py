"""Config values as users write them: one string where a tuple of strings is expected is a one-element
tuple, in a TOML file, in a `--set` override and through `piccolo-jax train --print-config`; every other
type error is still refused with the one-line message naming the key. In-process: nothing here compiles."""

from __future__ import annotations

import json

import pytest

from piccolo_jax.cli import main
from piccolo_jax.config import ConfigError, load_config


def test_a_string_for_a_tuple_of_strings_is_a_one_element_tuple(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.toml").write_text(
        '[data]\npaths = "mydata/"\nsymmetric_datasets = "nli"\n[finetune.data]\npaths = "ft"\n')
    from_file = load_config(tmp_path / "conf" / "mine.toml", "pretrain")
    assert from_file.data.paths == (str(tmp_path / "conf" / "mydata"),)  # relative to the file, as a list is
    assert from_file.data.symmetric_datasets == ("nli",)
    assert load_config(tmp_path / "conf" / "mine.toml", "finetune").data.paths == (str(tmp_path / "conf" / "ft"),)
    sets = load_config(None, "finetune", ["data.paths=mydata/", 'data.symmetric_datasets="nli"',
                                          "pretrain.data.paths=other"])
    assert sets.data.paths == (str(tmp_path / "mydata"),)  # relative to the current directory
    assert sets.data.symmetric_datasets == ("nli",)
    listed = load_config(None, "finetune", ['data.paths=["mydata/"]', 'data.symmetric_datasets=["nli"]'])
    assert (listed.data.paths, listed.data.symmetric_datasets) == (sets.data.paths, sets.data.symmetric_datasets)


@pytest.mark.parametrize("override,needle", [
    ("data.paths=3", "data.paths: expected tuple, got int 3"),
    ('data.paths=["a", 3]', "data.paths[1]: expected str, got int 3"),
    ("data.weights=faq", "data.weights: expected tuple, got str 'faq'"),  # pairs, not strings
    ('loss.matryoshka_dims="64"', "loss.matryoshka_dims: expected tuple, got str '64'"),  # ints, not strings
    ("finetune.data.symmetric_datasets=1", "data.symmetric_datasets: expected tuple, got int 1"),  # other stage
])
def test_other_type_errors_are_still_refused(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, "pretrain", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_print_config_takes_one_path_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--stage", "finetune", "--print-config", "--set", "data.paths=mydata/"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["paths"] == [str(tmp_path / "mydata")]
    assert main(["train", "--stage", "finetune", "--print-config", "--set", "data.paths=3"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["piccolo-jax train: error: --set data.paths=3: data.paths: expected tuple, got int 3"]


@pytest.mark.parametrize("override,line", [
    ("optim.learning_rate=1e-4", "--set optim.learning_rate=1e-4: optim: unknown key 'learning_rate'; did you mean "
     "'lr'? known: ['b1', 'b2', 'clip_norm', 'eps', 'lr', 'schedule', 'warmup_steps', 'weight_decay']"),
    ("finetune.optim.warmup=3", "--set finetune.optim.warmup=3: optim: unknown key 'warmup'; did you mean "
     "'warmup_steps'? known: ['b1', 'b2', 'clip_norm', 'eps', 'lr', 'schedule', 'warmup_steps', 'weight_decay']"),
    ("optm.lr=1e-4", "--set optm.lr=1e-4: unknown section or key 'optm'; did you mean 'optim'? known: ['data', "
     "'init', 'loss', 'model', 'optim', 'parallel', 'run', 'stage', 'tokenizer', 'pretrain', 'finetune']"),
    ("optim.xyz=1", "--set optim.xyz=1: optim: unknown key 'xyz'; known: ['b1', 'b2', 'clip_norm', 'eps', 'lr', "
     "'schedule', 'warmup_steps', 'weight_decay']"),  # nothing close: no question
])
def test_an_unknown_key_names_the_one_meant(override, line, capsys):
    """A misspelt or foreign name (learning_rate is lr here) gets a "did you mean", in one line, exit 2."""
    assert main(["train", "--stage", "pretrain", "--print-config", "--set", override]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err == [f"piccolo-jax train: error: {line}"]

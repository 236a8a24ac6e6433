"""The package as a user installs it: a wheel in a fresh virtual environment, no source tree in sight.

Builds the wheel, checks that it holds only the `piccolo_jax` package (with its configs, tokenizer and
sample data), installs it into a new venv, and runs the quickstart's training command from an empty temporary
directory through the `piccolo-jax` console script.

The venv sees this environment's packages (`--system-site-packages`, installed from constraints.txt) instead
of downloading and unpacking ~1 GB of them again; `pip check` then proves that the wheel's declared
dependencies are met by them, and the test proves that the code that ran is the wheel's, not the checkout's.
A venv of its own with every dependency downloaded is what the README's quickstart does on a fresh clone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = out.glob("piccolo_jax-*.whl")
    return path


def test_wheel_holds_only_the_package_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"piccolo_jax"}, top
    for needed in ("piccolo_jax/configs/tiny.toml", "piccolo_jax/configs/pretrain.toml",
                   "piccolo_jax/assets/tokenizer/vocab.txt", "piccolo_jax/assets/data/pretrain/paraphrase.jsonl",
                   "piccolo_jax/assets/eval/sts.jsonl", "piccolo_jax/assets/eval/retrieval/corpus.jsonl",
                   "piccolo_jax/hf/name_table.py", "piccolo_jax/cli.py"):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "piccolo-jax = piccolo_jax.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_quickstart_from_a_fresh_venv_outside_the_source_tree(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # Nothing of the checkout may leak in (a PYTHONPATH pointing at it makes pip think it is installed).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    # --force-reinstall: this environment's own (editable) piccolo-jax has the wheel's version.
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # Every dependency the wheel declares is met (by the packages of constraints.txt it sees).
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, env=env)
    assert not [line for line in check.stdout.splitlines() if line.lower().startswith("piccolo-jax")], check.stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    r = subprocess.run([str(venv / "bin" / "piccolo-jax"), "train", "--stage", "pretrain", "--set", "run.steps=4",
                        "--set", "run.progress_bar=false"], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import piccolo_jax; print(piccolo_jax.__file__)"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert str(venv) in site and str(ROOT) not in site  # the wheel's code ran, not the checkout's
    info = json.loads((elsewhere / "runs" / "pretrain" / "export" / "export.json").read_text())
    assert info["step"] == 4
    assert (elsewhere / "runs" / "pretrain" / "export" / "hf" / "vocab.txt").is_file()
    r = subprocess.run([str(python), "-c", "import conversion"], cwd=elsewhere, env=env, capture_output=True)
    assert r.returncode != 0  # no generic top-level package besides piccolo_jax

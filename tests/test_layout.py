"""The house rules: which subpackage of piccolo_jax may import which, and what starts without JAX.

The table is the README's Layout section in code. A subpackage imports only from itself and the ones
listed for it (no import upward, hence no cycle); function-level imports count too, since they are
dependencies all the same. `config/` and every command's argument parsing import no JAX, so a bad flag,
a typo in `--set` or `--help` answers at once.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "piccolo_jax"

# subpackage -> the subpackages it may import (besides itself); "top" = cli.py, __init__.py, __main__.py
ALLOWED = {
    "config": set(),
    "io": {"config"},
    "text": {"config", "io"},
    "parallel": {"config"},
    "model": {"config", "io", "parallel"},
    "losses": {"config"},
    "data": {"config", "io", "text", "parallel"},
    "hf": {"config", "io", "text", "model"},
    "inference": {"config", "io", "text", "parallel", "model", "hf"},
    "evaluation": {"config", "io", "text", "parallel", "model", "hf", "inference"},
    "training": {"config", "io", "text", "parallel", "model", "losses", "data", "hf", "inference", "evaluation"},
    "commands": {"config", "io", "text", "parallel", "model", "losses", "data", "hf", "inference", "evaluation",
                 "training"},
    "top": {"commands", "inference"},
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "top"


def _imports() -> list[tuple[str, str, int, str]]:
    """(importing module, imported piccolo_jax module, line, file) for every import in the package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("piccolo_jax"):
                targets = [node.module] if node.module != "piccolo_jax" else [f"piccolo_jax.{a.name}" for a in node.names]
                out += [(module, t, node.lineno, str(rel)) for t in targets]
            elif isinstance(node, ast.Import):
                out += [(module, a.name, node.lineno, str(rel)) for a in node.names if a.name.startswith("piccolo_jax.")]
    return out


def test_the_rooms_are_the_table():
    rooms = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert rooms == set(ALLOWED) - {"top"}
    top_modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert top_modules == {"__init__", "__main__", "cli"}, "library code belongs in a subpackage"
    for room in rooms:
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "May import" in doc or room in ("hf", "commands"), f"{room}/__init__.py: say what lives there"


def test_the_table_has_no_cycle():
    seen, done = set(), set()

    def visit(room, path):
        assert room not in seen - done, f"cycle: {' -> '.join(path)}"
        if room in done:
            return
        seen.add(room)
        for dep in ALLOWED[room]:
            visit(dep, path + [dep])
        done.add(room)

    for room in ALLOWED:
        visit(room, [room])


def test_no_import_outside_the_table():
    bad = []
    for module, target, line, file in _imports():
        src, dst = _room(module), _room(target)
        if src != dst and dst not in ALLOWED[src]:
            bad.append(f"{file}.py:{line}: {src} imports {target} ({dst})")
    assert not bad, "imports against the layout:\n" + "\n".join(bad)


def test_the_checker_sees_a_planted_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "piccolo_jax"
    (fake / "config").mkdir(parents=True)
    (fake / "training").mkdir()
    for room in ("config", "training"):
        (fake / room / "__init__.py").write_text('"""May import: ..."""\n')
    (fake / "config" / "train.py").write_text("from piccolo_jax.training.loop import train\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="config imports piccolo_jax.training.loop"):
        test_no_import_outside_the_table()


# Each command's parser (and the config loader) on a bad or helpful input: it must answer without JAX.
NO_JAX = """
import sys
from piccolo_jax.cli import main
try:
    code = main({argv!r})
except SystemExit as e:
    code = e.code
print("EXIT", code, "JAX", "jax" in sys.modules, file=sys.stderr)
"""

REFUSALS = [
    (["train", "--stage", "pretrain", "--set", "optim.learning_rate=1e-4"], 2, "optim.learning_rate"),
    (["train", "--stage", "finetune", "--set", "model.hidden_size=big"], 2, "hidden_size"),
    (["train", "--stage", "pretrian"], 2, "pretrian"),
    (["train", "--stage", "pretrain", "--config", "nonexistent_recipe"], 2, "nonexistent_recipe"),
    (["train", "--stage", "pretrain", "--print-config"], 0, "temperature"),
    (["encode", "--model", "m", "--output", "o.npy"], 2, "--input"),
    (["evaluate", "--model", "m", "--frobnicate"], 2, "frobnicate"),
    (["mine", "--model", "m"], 2, "required"),
    (["convert", "sideways", "a", "b"], 2, "sideways"),
    (["prepare", "--output", "out", "--record-format", "nope", "in.jsonl"], 2, "nope"),
    (["prepare", "--output", "out", "--columns", "passage=answer", "in.parquet"], 2, "'passage' is not a record key"),
    # a hub model id that is not in the cache (HF_HUB_OFFLINE=1, from conftest): one line before JAX
    (["convert", "hf2jax", "nobody/nothing", "out"], 2, "hf download nobody/nothing"),
    (["train", "--stage", "pretrain", "--init", "nobody/nothing"], 2, "hf download nobody/nothing"),
    (["evaluate", "--model", "m", "--no-instructions", "--query-prefix", "q: ", "t"], 2, "contradict"),
]


@pytest.mark.parametrize("argv,code,text", REFUSALS + [([c, "--help"], 0, "usage") for c in
                                                      ("train", "encode", "evaluate", "mine", "convert", "prepare")])
def test_refusals_and_help_start_no_jax(argv, code, text):
    r = subprocess.run([sys.executable, "-c", NO_JAX.format(argv=argv)], capture_output=True, text=True,
                       timeout=120)
    assert f"EXIT {code} JAX False" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert text in r.stdout + r.stderr


# What a trainer start imports: the loop, the encoder and the TensorBoard writer, without the packages
# they would load for nothing (piccolo_jax.io.lean_imports), and each of them still importable after; a
# URL work directory then gets tensorboardX's own gs:// writer (its module reloaded with the client).
LEAN = """
import importlib, importlib.util, sys
from piccolo_jax.training import loop
from piccolo_jax.training.metrics_log import _summary_writer
_summary_writer(url=False)
names = ("torch", "boto3", "google.cloud.storage", "IPython")
print("LOADED", sorted(m for m in names if m in sys.modules))
from tensorboardX import record_writer
print("LOCAL GCS", record_writer.GCS_ENABLED)
_summary_writer(url=True)
print("URL GCS", record_writer.GCS_ENABLED, "gs" in record_writer.REGISTERED_FACTORIES)
installed = [m for m in names if importlib.util.find_spec(m.split(".")[0]) is not None]
for m in installed:
    importlib.import_module(m)
print("IMPORTABLE", installed)
"""


def test_a_trainer_start_loads_neither_torch_nor_storage_clients_nor_ipython():
    r = subprocess.run([sys.executable, "-c", LEAN], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr[-3000:]
    assert "LOADED []" in r.stdout and "IMPORTABLE ['torch', " in r.stdout, out
    assert "LOCAL GCS False" in r.stdout and "URL GCS True True" in r.stdout, out

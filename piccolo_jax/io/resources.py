"""Files that ship with the package: the configs, the bert-base-chinese tokenizer, the sample data and
the sample evaluation tasks.

In a source checkout (or an editable install) they are the repository's `configs/` and `assets/`; an
installed wheel carries the same trees as `piccolo_jax/configs/` and `piccolo_jax/assets/`. Either way
they are found from this file, never from the current directory.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # piccolo_jax/


def _tree(name: str) -> Path:
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):  # wheel, then source checkout
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the bundled {name}/ directory is missing from this installation ({PACKAGE_DIR})")


def configs_dir() -> Path:
    return _tree("configs")


def assets_dir() -> Path:
    return _tree("assets")


def bundled_tokenizer() -> Path:
    """bert-base-chinese WordPiece vocabulary (21,128 tokens), piccolo's tokenizer."""
    return assets_dir() / "tokenizer"


BUNDLED_EVAL = "bundled"  # the name of the sample evaluation tasks: `piccolo-jax evaluate --model M bundled`


def bundled_eval_dir() -> Path:
    """The sample evaluation tasks (a retrieval directory, an STS and a reranking .jsonl)."""
    return assets_dir() / "eval"


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.toml"))


def find_config(name_or_path: str) -> Path:
    """A config file: an existing path, else a bundled config by name (`tiny`, `pretrain.toml`,
    `configs/finetune.toml` from any directory)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[:-len(".toml")] if path.name.endswith(".toml") else path.name
    if (path.parent == Path(".") or path.parent.name == "configs") and stem in bundled_configs():
        return configs_dir() / f"{stem}.toml"
    raise FileNotFoundError(f"{name_or_path}: config file not found (bundled configs: "
                            f"{', '.join(bundled_configs())})")

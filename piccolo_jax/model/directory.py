"""Our model directory: `config.json` + Orbax parameter checkpoint + tokenizer / sentence-transformers files.

Layout of a model directory written by `save_model_dir`:

    config.json        transformers-style BertConfig plus our `pooling` / `normalize` fields
    params/            Orbax StandardCheckpointer tree of float32 arrays (same nesting as the model)
    tokenizer files    copied verbatim (tokenizer.json, vocab.txt, ...)

Writes go to a temporary sibling directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from piccolo_jax.config.model import ModelConfig
from piccolo_jax.io.storage import as_path, is_url, local_copy, ocdbt_supported

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
PARAMS_SUBDIR = "params"


def to_storage(tree: Any) -> Any:
    """Orbax stores dict keys as strings: make the nnx.List layer indices explicit strings."""
    if isinstance(tree, dict):
        return {str(k): to_storage(v) for k, v in tree.items()}
    return tree


def from_storage(tree: Any) -> Any:
    """Inverse of `to_storage`: digit keys become layer indices again."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): from_storage(v) for k, v in tree.items()}
    return tree


def atomic_directory(dest: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run `write(tmp_dir)` and rename tmp_dir to `dest` only if it succeeds; on failure nothing is left."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest} exists and is not empty (pass overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        apply_umask(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the permissions a plain mkdir / open would (0777 / 0666 less
    the umask): temporary directories are created 0700 and some writers create files 0600, which would
    leave a model on a shared disk unreadable by others. (Objects in a bucket have no modes.)"""
    if is_url(root):
        return
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def write_params(path: Path, params: Any) -> None:
    import orbax.checkpoint as ocp

    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=ocdbt_supported(path)))
    ckptr.save(as_path(path), args=ocp.args.StandardSave(to_storage(params)))


def read_params(path: Path, abstract: Any | None = None) -> Any:
    """Restore parameters; with `abstract` (ShapeDtypeStructs carrying shardings) they arrive sharded."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    target = None if abstract is None else to_storage(abstract)
    return from_storage(ckptr.restore(as_path(path), target))


def copy_side_files(src, dst, names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copy the files `names` that `src` has into `dst` (either may be a URL); returns those copied."""
    src, dst, copied = as_path(src), as_path(dst), []
    for name in names:
        if (src / name).is_file():
            if is_url(src) or is_url(dst):
                (dst / name).write_bytes((src / name).read_bytes())
            else:
                shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def save_model_dir(dest: str | os.PathLike, cfg: ModelConfig, params: Any, *, side_files_from: str | None = None,
                   overwrite: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
    """Write config + params (+ tokenizer files copied from `side_files_from`) atomically."""
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), dtype=np.float32), params)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
        write_params(tmp / PARAMS_SUBDIR, params)
        if side_files_from is not None:
            copy_side_files(Path(side_files_from), tmp)
        if extra is not None:
            extra(tmp)

    return atomic_directory(dest, write, overwrite=overwrite)


def stored_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors in a `params/` checkpoint from its metadata alone (nothing is read)."""
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().metadata(as_path(path))
    tree = getattr(tree, "item_metadata", tree)  # Orbax >= 0.11 wraps the tree
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in keypath): tuple(leaf.shape) for keypath, leaf in flat}


def check_shapes_match(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse, before any model is built, a config whose sizes disagree with the stored tensors.

    Checks the word embedding table ([vocab, hidden]) and the number of layers, whether layers are stored
    one subtree each (`layers/<i>/...`) or stacked on a leading axis (`layers/...` of shape [L, ...]).
    """
    word = next((shape for name, shape in shapes.items() if name.endswith("word/embedding")), None)
    if word is not None and word != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"{source}: the word embedding table is {list(word)}, but config.json says "
                         f"vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}")
    layer_names = [name.split("/") for name in shapes if name.startswith("layers/")]
    indexed = {parts[1] for parts in layer_names if len(parts) > 2 and parts[1].isdigit()}
    if indexed:
        stored = len(indexed)
    else:
        stored = next((shapes["/".join(parts)][0] for parts in layer_names if shapes["/".join(parts)]), 0)
    if stored != cfg.num_hidden_layers:
        raise ValueError(f"{source}: {stored} layers are stored, but config.json says "
                         f"num_hidden_layers={cfg.num_hidden_layers}")


def is_model_dir(path: str | os.PathLike) -> bool:
    path = as_path(path)
    return (path / "config.json").is_file() and (path / PARAMS_SUBDIR).is_dir()


def load_model_dir(path: str | os.PathLike, abstract: Any | None = None,
                   **config_overrides: Any) -> tuple[ModelConfig, Any]:
    """Read (config, params) from a directory written by `save_model_dir`."""
    path = as_path(path)
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path}: not a piccolo-jax model directory (needs config.json and {PARAMS_SUBDIR}/)")
    cfg = ModelConfig.from_json_file(local_copy(path, ("config.json",)) / "config.json", **config_overrides)
    shapes = stored_shapes(path / PARAMS_SUBDIR)
    check_shapes_match(cfg, shapes, str(path))
    if any(name.split("/")[1].isdigit() for name in shapes if name.startswith("layers/")):
        # Saved before the layers were stacked ([L, ...] arrays): read as stored, stack, then place.
        from piccolo_jax.model.bert import stack_layers

        params = jax.tree.map(np.asarray, stack_layers(read_params(path / PARAMS_SUBDIR)))
        if abstract is not None:
            params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, abstract))
        return cfg, params
    return cfg, read_params(path / PARAMS_SUBDIR, abstract)

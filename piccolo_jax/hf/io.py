"""Hugging Face PyTorch-format BERT directories <-> our parameter tree.

Reading accepts `model.safetensors` (single or sharded with an index) or `pytorch_model.bin` (loaded with
`weights_only=True`; float16 / bfloat16 are upcast to float32), names with or without a `bert.` prefix,
and TF-era `gamma` / `beta` LayerNorm names. Every tensor of the name table must be present with the
expected shape, and every tensor read must be used: anything else stops with an error naming it.

sentence-transformers modules (modules.json): Transformer, then Pooling (mean or cls), then optionally
one Dense (bias, identity activation: piccolo-large-zh-v2's `2_Dense`, 1,024 -> 1,792) and Normalize.
Written: `1_Pooling/`, with a Dense head `2_Dense/` (config.json + model.safetensors) and `3_Normalize/`,
else `2_Normalize/`. Any other module, order or activation is refused naming the file. The
sentence-transformers files of the source (sentence_bert_config.json, config_sentence_transformers.json:
max_seq_length, prompts) are copied; `write_hf_dir(..., prompts=(q, p))` sets the prompts (`prompts`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from piccolo_jax.config.model import ModelConfig
from piccolo_jax.hf import name_table
from piccolo_jax.hf.prompts import ST_CONFIG, write_prompts
from piccolo_jax.model.directory import (
    TOKENIZER_FILES,
    atomic_directory,
    copy_side_files,
)

ST_FILES = ("sentence_bert_config.json", ST_CONFIG)


class ConversionError(ValueError):
    """A checkpoint does not match the model: the message names the tensor / file and the shapes."""


# ------------------------------------------------------------------------------------------------ reading
def read_hf_tensors(hf_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF directory as float32 numpy arrays (integer buffers kept as they are)."""
    hf_dir = Path(hf_dir)
    single, index, binary = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json", \
        hf_dir / "pytorch_model.bin"
    if single.is_file():
        tensors = _read_safetensors(single)
    elif index.is_file():
        tensors = {}
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for shard in shards:
            tensors.update(_read_safetensors(hf_dir / shard))
    elif binary.is_file():
        tensors = _read_torch_bin(binary)
    else:
        raise ConversionError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v) for k, v in tensors.items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from e
    except TypeError as e:  # bfloat16 is not a numpy dtype: go through torch
        try:
            from safetensors.torch import load_file as load_torch
        except ImportError:
            raise ConversionError(f"{path}: {e}; install the torch extra to read bfloat16 tensors") from e
        return {k: v.float().numpy() for k, v in load_torch(str(path)).items()}


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{path}: reading pytorch_model.bin needs torch (pip install '.[torch]')") from e
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt pickles / zips
        raise ConversionError(_torch_load_error(path, e)) from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = (v.float() if v.is_floating_point() else v).numpy()
    return out


def _torch_load_error(path: Path, e: Exception) -> str:
    """One line for a `torch.load(weights_only=True)` failure, without torch's advice to retry with
    weights_only=False: a pickle that names a callable or class outside torch's allowlist (os.system, a
    custom class) is refused as such; anything else is an unreadable file, with torch's first sentence."""
    text = str(e)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return (f"{path}: refused, not loaded: its pickle references {refused.group(1)}: the file tries to run "
                "code or holds objects that are not tensors; only tensors are read (model.safetensors is the safe "
                "format)")
    detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    first = lines[0].split(". ")[0].rstrip(".") if lines else type(e).__name__
    return f"{path}: unreadable PyTorch checkpoint (truncated or corrupt?): {first}"


# ------------------------------------------------------------------------------------------------ mapping
def _set(tree: dict, path: str, value: Any) -> None:
    keys = path.split("/")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: dict, path: str) -> Any:
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    import jax

    from piccolo_jax.model.bert import abstract_model

    _, abstract, _ = abstract_model(cfg)
    flat = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        flat["/".join(str(getattr(k, "key", k)) for k in keypath)] = tuple(leaf.shape)
    return flat


def _check_layer_count(canonical_names, cfg: ModelConfig, source: str) -> None:
    """config.json's num_hidden_layers against the `encoder.layer.{i}.` indices present, before any build."""
    present = name_table.layer_indices(canonical_names)
    n = max(present) + 1 if present else 0
    if n != cfg.num_hidden_layers:
        found = f"encoder.layer.0 ... encoder.layer.{n - 1}" if n else "no encoder.layer.* tensors"
        raise ConversionError(f"{source}: config.json has num_hidden_layers={cfg.num_hidden_layers} but the "
                              f"weights have {n} layers ({found}); does config.json match the weights?")


def hf_to_params(tensors: dict[str, np.ndarray], cfg: ModelConfig, source: str = "checkpoint"
                 ) -> tuple[dict, dict[str, int]]:
    """Map HF tensors onto our tree (layers stacked). Returns (params, report counting ignored tensors)."""
    canon: dict[str, str] = {}
    for name in tensors:
        c = name_table.canonical_hf_name(name)
        if c in canon:
            raise ConversionError(f"{source}: tensors {canon[c]!r} and {name!r} both map to {c!r}")
        canon[c] = name
    _check_layer_count(canon, cfg, source)
    expected = _expected_shapes(cfg)
    stacked: dict[str, list] = {}
    flat: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for hf_name, ours, layer, hook in name_table.table(cfg):
        shape = expected[ours] if layer is None else expected[ours][1:]  # one layer of a stacked array
        if hf_name not in canon:
            raise ConversionError(f"{source}: missing tensor {hf_name!r} (needed for {ours}"
                                  f"{'' if layer is None else f'[{layer}]'}, shape {shape}); does config.json "
                                  "match the weights?")
        raw = tensors[canon[hf_name]]
        value = hook(raw)
        if value.shape != shape:
            raise ConversionError(
                f"{source}: tensor {hf_name!r} has shape {tuple(raw.shape)}, expected "
                f"{_hf_shape(shape, hook)} from config.json (ours {ours}: {expected[ours]})")
        value = np.asarray(value, dtype=np.float32)
        if layer is None:
            flat[ours] = value
        else:
            stacked.setdefault(ours, [None] * cfg.num_hidden_layers)[layer] = value
        used.add(hf_name)
    params: dict = {}
    for ours, value in flat.items():
        _set(params, ours, value)
    for ours, layers in stacked.items():
        _set(params, ours, np.stack(layers))
    report = {"ignored_buffers": 0, "ignored_head_tensors": 0}
    unexpected = []
    for c, original in canon.items():
        if c in used:
            continue
        if c in name_table.IGNORED_BUFFERS:
            _check_position_ids(tensors[original], source)
            report["ignored_buffers"] += 1
        elif c.startswith(name_table.IGNORED_HEAD_PREFIXES):
            report["ignored_head_tensors"] += 1
        else:
            unexpected.append(f"{original} {tuple(tensors[original].shape)}")
    if unexpected:
        raise ConversionError(f"{source}: unexpected tensors not used by the model (config.json has "
                              f"{cfg.num_hidden_layers} layers, pooler={cfg.add_pooler}): {unexpected}")
    return params, report


def _hf_shape(ours_shape: tuple[int, ...], hook) -> tuple[int, ...]:
    return tuple(reversed(ours_shape)) if hook is name_table.transpose else ours_shape


def _check_position_ids(buf: np.ndarray, source: str) -> None:
    if not np.array_equal(np.asarray(buf).reshape(-1), np.arange(np.asarray(buf).size)):
        raise ConversionError(f"{source}: embeddings.position_ids is not arange(n); custom positions are "
                              "not supported")


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Inverse mapping: our tree -> HF `BertModel` state dict (float32, contiguous, no prefix)."""
    out, arrays = {}, {}
    for hf_name, ours, layer, hook in name_table.table(cfg):
        if ours not in arrays:  # one host copy per (stacked) array
            arrays[ours] = np.asarray(_get(params, ours), dtype=np.float32)
        value = arrays[ours]
        if layer is not None:
            value = value[layer]  # layer i of the stacked [L, ...] array
        out[hf_name] = np.ascontiguousarray(hook(value))  # transpose is its own inverse
    return out


# ----------------------------------------------------------------------------------------- HF directories
def load_hf_config(hf_dir: str | os.PathLike, tensor_names=None, **overrides: Any) -> ModelConfig:
    """ModelConfig from config.json + sentence-transformers module files (pooling, Dense head, normalisation)
    (+ pooler presence). A `dense_out_features` override must agree with the directory's Dense module, if it
    has one (without, a Dense head of that size is added: load_hf_model leaves it out of the params, to be
    initialised)."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir}: no config.json")
    extra: dict[str, Any] = {}
    dense = _st_dense_config(hf_dir)
    extra["dense_out_features"] = 0 if dense is None else int(dense["out_features"])
    asked = overrides.get("dense_out_features")
    if dense is not None and asked is not None and asked != extra["dense_out_features"]:
        raise ConversionError(f"{hf_dir} has a Dense module {dense['in_features']} -> {dense['out_features']}, but "
                              f"dense_out_features={asked} was asked for; set model.dense_out_features="
                              f"{extra['dense_out_features']}")
    pooling_cfg = _st_pooling_config(hf_dir)
    if pooling_cfg is not None:
        mode = pooling_cfg.get("pooling_mode")  # sentence-transformers >= 6: "mean", "cls", ...
        if pooling_cfg.get("pooling_mode_mean_tokens") or mode == "mean":
            extra["pooling"] = "mean"
        elif pooling_cfg.get("pooling_mode_cls_token") or mode == "cls":
            extra["pooling"] = "cls"
        else:
            raise ConversionError(f"{hf_dir}: sentence-transformers pooling {pooling_cfg} is not mean or cls")
        extra["normalize"] = _st_has_normalize(hf_dir)
    if tensor_names is not None:
        extra["add_pooler"] = name_table.has_pooler(tensor_names)
    extra.update(overrides)
    cfg = ModelConfig.from_json_file(hf_dir / "config.json", **extra)
    if dense is not None and int(dense["in_features"]) != cfg.hidden_size:
        raise ConversionError(f"{hf_dir / dense['path'] / 'config.json'}: in_features={dense['in_features']}, but "
                              f"the encoder's hidden_size is {cfg.hidden_size}")
    return cfg


_MODULE_ORDER = ("Transformer", "Pooling", "Dense", "Normalize")  # the kinds we read, in this order


def _st_modules(hf_dir: Path) -> list[dict]:
    """modules.json's entries, checked: kinds we read, in our order, at most one of each."""
    p = hf_dir / "modules.json"
    if not p.is_file():
        return []
    try:
        modules = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unknown = [k for k in kinds if k not in _MODULE_ORDER]
    if unknown:
        raise ConversionError(f"{p}: sentence-transformers modules {unknown} are not supported (supported: "
                              f"{', '.join(_MODULE_ORDER)}, in that order)")
    order = [_MODULE_ORDER.index(k) for k in kinds]
    if order != sorted(set(order)):
        raise ConversionError(f"{p}: modules {kinds}; supported is Transformer, Pooling, then optionally one Dense "
                              "and one Normalize, in that order")
    return modules


def _st_dense_config(hf_dir: Path) -> dict | None:
    """The Dense module's config.json (plus its "path"), checked: bias, identity activation; or None."""
    for m in _st_modules(hf_dir):
        if str(m.get("type", "")).endswith("Dense"):
            path = hf_dir / m["path"] / "config.json"
            try:
                dense = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ConversionError(f"{path}: cannot read the Dense module's config: {e}") from None
            activation = str(dense.get("activation_function", "torch.nn.modules.activation.Tanh"))
            if not activation.endswith(".Identity"):
                raise ConversionError(f"{path}: activation_function {activation!r}; only a linear Dense "
                                      "(torch.nn.modules.linear.Identity) is supported")
            if not dense.get("bias", True):
                raise ConversionError(f"{path}: bias false; only a Dense with bias is supported")
            if dense.get("use_residual"):
                raise ConversionError(f"{path}: use_residual true is not supported")
            for key in ("module_input_name", "module_output_name"):
                if dense.get(key, "sentence_embedding") != "sentence_embedding":
                    raise ConversionError(f"{path}: {key}={dense[key]!r}; only a Dense on the sentence embedding "
                                          "is supported")
            for key in ("in_features", "out_features"):
                if isinstance(dense.get(key), bool) or not isinstance(dense.get(key), int) or dense[key] < 1:
                    raise ConversionError(f"{path}: {key} must be a positive int, got {dense.get(key)!r}")
            return {**dense, "path": m["path"]}
    return None


def read_dense(hf_dir: str | os.PathLike, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The Dense module's tensors mapped onto {"kernel": [D, E], "bias": [E]} (float32); every tensor of its
    file used, shapes checked."""
    hf_dir = Path(hf_dir)
    dense = _st_dense_config(hf_dir)
    folder = hf_dir / dense["path"]
    if (folder / "model.safetensors").is_file():
        tensors = _read_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        tensors = _read_torch_bin(folder / "pytorch_model.bin")
    else:
        raise ConversionError(f"{folder}: no model.safetensors or pytorch_model.bin for the Dense module")
    d, e = cfg.hidden_size, cfg.dense_out_features
    out = {}
    for hf_name, ours, _, hook in name_table.dense_table(cfg):
        if hf_name not in tensors:
            raise ConversionError(f"{folder}: missing tensor {hf_name!r} of the Dense module ({d} -> {e})")
        value = np.asarray(hook(np.asarray(tensors[hf_name], np.float32)), np.float32)
        want = (d, e) if ours.endswith("kernel") else (e,)
        if value.shape != want:
            raise ConversionError(f"{folder}: tensor {hf_name!r} has shape {tuple(tensors[hf_name].shape)}, expected "
                                  f"{tuple(reversed(want))} for a Dense {d} -> {e}")
        out[ours.split("/")[-1]] = value
    unused = sorted(set(tensors) - {row.hf for row in name_table.dense_table(cfg)})
    if unused:
        raise ConversionError(f"{folder}: unexpected tensors in the Dense module: {unused}")
    return out


def _st_pooling_config(hf_dir: Path) -> dict | None:
    for m in _st_modules(hf_dir):
        if m.get("type", "").endswith("Pooling"):
            return json.loads((hf_dir / m["path"] / "config.json").read_text(encoding="utf-8"))
    return None


def _st_has_normalize(hf_dir: Path) -> bool:
    return any(m.get("type", "").endswith("Normalize") for m in _st_modules(hf_dir))


def load_hf_model(hf_dir: str | os.PathLike, **overrides: Any) -> tuple[ModelConfig, dict, dict[str, int]]:
    """Read an HF directory into (config, params as numpy float32, report of ignored tensors); a Dense
    module (`2_Dense/`) becomes params["dense"]. A `dense_out_features` override on a directory without
    one leaves params["dense"] out (`train_step.create_train_state` initialises it)."""
    tensors = read_hf_tensors(hf_dir)
    cfg = load_hf_config(hf_dir, tensor_names=tensors.keys(), **overrides)
    params, report = hf_to_params(tensors, cfg, source=str(hf_dir))
    if cfg.dense_out_features and _st_dense_config(Path(hf_dir)) is not None:
        params["dense"] = read_dense(hf_dir, cfg)
    return cfg, params, report


def dense_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our Dense head -> the sentence-transformers Dense module's state dict (linear.weight [E, D], bias)."""
    return {hf_name: np.ascontiguousarray(hook(np.asarray(_get(params, ours), np.float32)))
            for hf_name, ours, _, hook in name_table.dense_table(cfg)}


def write_hf_dir(dest: str | os.PathLike, cfg: ModelConfig, params: dict, *, side_files_from=None,
                 max_seq_length: int | None = None, overwrite: bool = False,
                 prompts: tuple[str, str] | None = None) -> Path:
    """Write an HF `BertModel` directory that `SentenceTransformer(dest)` loads with our pooling.

    prompts: (query prefix, passage prefix) written as sentence-transformers' "query" / "document" prompts
    (`hf.prompts.write_prompts`); None keeps the prompts of `side_files_from`'s config, if any.
    """
    from safetensors.numpy import save_file

    state = params_to_hf(params, cfg)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
        copied = copy_side_files(Path(side_files_from), tmp, TOKENIZER_FILES + ST_FILES) if side_files_from \
            else []
        if not any(n in copied for n in ("tokenizer.json", "vocab.txt")):
            raise ConversionError(f"{side_files_from}: no tokenizer.json or vocab.txt to ship with the model")
        if "sentence_bert_config.json" not in copied:
            msl = max_seq_length or cfg.max_position_embeddings
            (tmp / "sentence_bert_config.json").write_text(
                json.dumps({"max_seq_length": msl, "do_lower_case": False}, indent=2) + "\n")
        _write_st_modules(tmp, cfg, params)
        if prompts is not None:
            write_prompts(tmp, *prompts)

    return atomic_directory(dest, write, overwrite=overwrite)


def _write_st_modules(tmp: Path, cfg: ModelConfig, params: dict) -> None:
    if cfg.pooling == "none":
        return
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if cfg.dense_out_features:  # sentence-transformers' Dense folder: config.json + model.safetensors
        from safetensors.numpy import save_file

        (tmp / "2_Dense").mkdir()
        dense = {"in_features": cfg.hidden_size, "out_features": cfg.dense_out_features, "bias": True,
                 "activation_function": "torch.nn.modules.linear.Identity"}
        (tmp / "2_Dense" / "config.json").write_text(json.dumps(dense, indent=2) + "\n")
        save_file(dense_to_hf(params, cfg), str(tmp / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if cfg.normalize:
        n = len(modules)
        modules.append({"idx": n, "name": str(n), "path": f"{n}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (tmp / f"{n}_Normalize").mkdir()
    (tmp / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (tmp / "1_Pooling").mkdir()
    pooling = {
        "word_embedding_dimension": cfg.hidden_size,
        "pooling_mode_cls_token": cfg.pooling == "cls",
        "pooling_mode_mean_tokens": cfg.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")

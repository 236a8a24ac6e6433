"""The trainer's configuration: typed frozen dataclasses, TOML files, type-checked `--set a.b=v` overrides.

A config file is TOML with one table per section (`[model]`, `[data]`, `[loss]`, `[optim]`,
`[parallel]`, `[run]`), an optional `base = "other.toml"` (that file is read first, its tables and
overlays deep-merged under this file's: a tiny variant of a recipe keeps every choice it does not
shrink; paths in each file stay relative to that file), plus optional stage overlays (`[pretrain.data]`, `[finetune.loss]`, ...) that
apply only to that stage; `--set pretrain.optim.lr=1e-4` is the same overlay on the command line. Unknown
sections or keys, and values of the wrong type, are refused with the file and key named, before anything
is compiled, in the overlays of both stages (a typo in the stage not being run is still a typo). A single
string where a tuple of strings is expected (`data.paths = "mydata/"`, `--set data.paths=mydata/`) is a
one-element tuple.

Paths (`tokenizer`, `init`, `data.paths`, `run.eval_path`) written in a config file are relative to that
file's directory; on the command line (`--set`, `--init`) relative to the current directory. Both are made
absolute when loaded, so WORKDIR/config.json names the files the run used. URLs (`gs://...`) are kept.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from piccolo_jax.config.data import DataConfig
from piccolo_jax.config.loss import LossConfig
from piccolo_jax.config.mesh import MeshConfig
from piccolo_jax.config.model import ModelConfig
from piccolo_jax.config.optim import OptimConfig

STAGES = ("pretrain", "finetune")
MATMUL_PRECISIONS = ("default", "high", "highest")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length of the run, logging, checkpointing and evaluation."""

    steps: int = 100  # optimizer steps (global batches) in the run
    seed: int = 0  # parameter init and dropout: step key = fold_in(key(seed), step)
    log_every: int = 10  # steps between metric lines (JSONL + TensorBoard)
    save_every: int = 50  # steps between checkpoints (asynchronous)
    keep_checkpoints: int = 3  # most recent checkpoints kept
    export_hf: bool = True  # write an HF + sentence-transformers directory at the end
    eval_path: str = ""  # held-out task: a retrieval directory or an STS / reranking .jsonl; "" = none
    eval_every: int = 0  # steps between evaluations (0 = only at the end, if eval_path is set)
    progress_bar: bool = True  # progress on process 0: a bar on a terminal, a log line per log_every otherwise
    # Stop with exit code 1 after this many consecutive steps whose loss, gradient or update was not finite
    # (each such step is skipped: parameters and optimizer state unchanged).
    max_consecutive_skipped: int = 10
    # Multi-host: a process that sends no heartbeat for this long is dead, and the others stop (exit 1).
    heartbeat_timeout_s: int = 60
    # Persistent XLA compilation cache: a restart (resume, preemption) reuses the compiled step instead of
    # compiling again, and its traced program (programs/) instead of tracing it. "" = off.
    # JAX_COMPILATION_CACHE_DIR, when set, takes precedence.
    compilation_cache: str = "~/.cache/piccolo-jax/xla"
    # GPU: deterministic reductions (--xla_gpu_deterministic_ops), so that a restart reproduces the run
    # bit for bit (the embedding-gradient scatter-add is otherwise nondeterministic); a little slower.
    deterministic: bool = False
    # Device memory the train step may plan for, GiB per device; 0 = what the device's allocator allows.
    # Before the first step the compiled step's peak is checked against it (with 5 % headroom).
    memory_limit_gib: float = 0.0
    # Precision of float32 matmuls: "default" (TF32 on NVIDIA GPUs, bf16 passes on TPU), "high", "highest"
    # (true float32; what the 1e-5 parity claims assume). bfloat16 compute is unaffected.
    matmul_precision: str = "default"

    def __post_init__(self):
        for name in ("steps", "log_every", "save_every", "keep_checkpoints", "max_consecutive_skipped",
                     "heartbeat_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name}={getattr(self, name)} must be >= 1")
        if self.eval_every < 0:
            raise ValueError(f"run.eval_every={self.eval_every} must be >= 0")
        if not self.memory_limit_gib >= 0:
            raise ValueError(f"run.memory_limit_gib={self.memory_limit_gib} must be >= 0 (0 = the device's)")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"run.matmul_precision={self.matmul_precision!r}; expected one of {MATMUL_PRECISIONS}")


def check_matryoshka_width(loss: LossConfig, model: ModelConfig, whose: str = "") -> None:
    """ValueError (one line) when loss.matryoshka_dims asks for more than the embedding width of `model`,
    the model actually trained (`whose`: which one it is, for the message; "" = the config's model)."""
    width = model.embedding_dim
    too_wide = [d for d in loss.matryoshka_dims if d > width]
    if too_wide:
        raise ValueError(f"loss.matryoshka_dims {too_wide} exceed the embedding width {width} "
                         f"{whose or '(model.dense_out_features, else model.hidden_size)'}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. The resolved config is written to WORKDIR/config.json."""

    stage: str = "pretrain"  # "pretrain" (weak pairs, in-batch loss) or "finetune" (triplets, GTE loss)
    # Directory with tokenizer.json or vocab.txt. "" = the --init model's own tokenizer, or (random init) the
    # bundled bert-base-chinese vocabulary (21,128 tokens, piccolo's).
    tokenizer: str = ""
    init: str = ""  # HF directory, our model directory or a run directory; "" = random init
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    parallel: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}; expected one of {STAGES}")
        if self.loss.kind == "hard_negative" and self.data.num_negatives == 0:
            raise ValueError("loss.kind='hard_negative' needs data.num_negatives >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file / key."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check (and minimally convert) a TOML / CLI value against a dataclass field type."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, dict):  # a TOML table for a tuple of pairs, e.g. data.weights
            value = list(value.items())
        elif isinstance(value, str) and typing.get_args(typ) == (str, Ellipsis):
            value = [value]  # one string for a tuple of strings, e.g. data.paths = "mydata/"
        if isinstance(value, (list, tuple)):
            args = typing.get_args(typ)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(typ):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
    elif typ is type(None):
        if value is None:
            return None
    else:
        return value
    raise ConfigError(f"{where}: expected {getattr(typ, '__name__', typ)}, got {type(value).__name__} {value!r}")


def _initials(name: str) -> str:
    return "".join(word[:1] for word in name.split("_"))


def did_you_mean(key: str, known) -> str | None:
    """The known name `key` was most likely meant to be: a near spelling (difflib: warmpu_steps), the
    initials of its words (learning_rate -> lr), or a longer name it begins or is a word of (warmup ->
    warmup_steps); None when nothing is close."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return close[0]
    if "_" in key and _initials(key) in known:
        return _initials(key)
    if len(key) >= 3:
        return next((k for k in known if k.startswith(key) or key in k.split("_")), None)
    return None


def unknown(what: str, key: str, known: list[str]) -> str:
    """`unknown key 'learning_rate'; did you mean 'lr'? known: [...]` (the question only when one is close)."""
    guess = did_you_mean(key, known)
    return f"unknown {what} {key!r};{f' did you mean {guess!r}?' if guess else ''} known: {known}"


def _apply_section(current, cls, values: dict, where: str):
    types_ = _field_types(cls)
    changes = {}
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(f"{where}: {unknown('key', key, sorted(types_))}")
        changes[key] = _coerce(value, types_[key], f"{where}.{key}")
    try:
        return dataclasses.replace(current, **changes)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


# Fields that hold paths: (section or None, key). Relative values are resolved against a base directory.
PATH_FIELDS = {(None, "tokenizer"), (None, "init"), ("data", "paths"), ("run", "eval_path")}


# A Hugging Face hub model id ORG/NAME[@REVISION] (the hub's repo-name characters; a revision is a branch,
# tag or commit hash): `init` keeps one as it is when no such relative path exists (piccolo_jax.io.hub).
HUB_MODEL_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")


def _absolute(value: str, base: Path, key: str = "") -> str:
    if not value or "://" in value or os.path.isabs(value):
        return value
    path = os.path.abspath(os.path.join(base, os.path.expanduser(value)))
    if key == "init" and not os.path.exists(path) and HUB_MODEL_ID.match(value) and ".." not in value:
        return value
    return path


def _resolve_paths(tree: dict, base: Path) -> dict:
    """A copy of `tree` (one file table or override) with its path fields made absolute against `base`."""
    out = dict(tree)
    for section, key in PATH_FIELDS:
        table = out if section is None else out.get(section)
        if not isinstance(table, dict) or key not in table:
            continue
        if section is not None:
            table = out[section] = dict(table)
        value = table[key]
        if isinstance(value, str):
            table[key] = _absolute(value, base, key)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            table[key] = [_absolute(v, base) for v in value]
    return out


def _check_overlay(tree: dict, where: str) -> None:
    """Keys and value types of an overlay for the stage not being run (it is not applied)."""
    fields = _field_types(TrainConfig)
    for key, value in tree.items():
        if key not in fields or key == "stage":
            raise ConfigError(f"{where}: unknown section or key {key!r}; known: {sorted(set(fields) - {'stage'})}")
        if dataclasses.is_dataclass(fields[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table")
            types_ = _field_types(fields[key])
            for k, v in value.items():
                if k not in types_:
                    raise ConfigError(f"{where}: {key}: {unknown('key', k, sorted(types_))}")
                _coerce(v, types_[k], f"{where}: {key}.{k}")
        else:
            _coerce(value, fields[key], f"{where}: {key}")


def _apply(cfg: TrainConfig, tree: dict, where: str) -> TrainConfig:
    fields = _field_types(TrainConfig)  # sections are the dataclass-typed fields, the rest are scalars
    top = {}
    for key, value in tree.items():
        if key in STAGES:
            continue  # stage overlays are applied by load_config
        if key not in fields:
            raise ConfigError(f"{where}: {unknown('section or key', key, [*sorted(fields), *STAGES])}")
        if dataclasses.is_dataclass(fields[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table")
            top[key] = _apply_section(getattr(cfg, key), fields[key], value, f"{where}: {key}")
        else:
            top[key] = _coerce(value, fields[key], f"{where}: {key}")
    try:
        return dataclasses.replace(cfg, **top)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=2e-5` -> (["optim", "lr"], 2e-5). Values are TOML literals; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=2e-5")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as run.eval_path=data/eval
    return key.strip().split("."), value


BASE_KEY = "base"  # a config file's parent: read first, this file's values merged over it


def _merge(under: dict, over: dict) -> dict:
    """`over` deep-merged onto `under` (tables merge key by key; any other value replaces)."""
    out = dict(under)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file as one tree: its `base` chain merged (each file's paths made absolute against its own
    directory, stage overlays included), the file itself last."""
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    here = path.resolve().parent
    tree = _resolve_paths(tree, here)
    for name in STAGES:
        if isinstance(tree.get(name), dict):
            tree[name] = _resolve_paths(tree[name], here)
    base = tree.pop(BASE_KEY, None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {BASE_KEY} must be the path of another config file, got {base!r}")
    base_path = (here / base).resolve()
    if base_path in chain + (path.resolve(),):
        raise ConfigError(f"{path}: {BASE_KEY} = {base!r} makes a cycle ({' -> '.join(map(str, chain))})")
    try:
        parent = _read_tree(base_path, chain + (path.resolve(),))
    except ConfigError as e:
        raise ConfigError(f"{path}: {BASE_KEY} = {base!r}: {e}") from None
    return _merge(parent, tree)


def load_config(path: str | Path | None, stage: str, overrides: list[str] = (),
                base_dir: str | Path | None = None) -> TrainConfig:
    """Defaults <- file (shared tables, then the stage's overlay) <- `--set` overrides, all type-checked.

    Relative paths in the file are resolved against the file's directory; in `overrides` against
    `base_dir` (default: the current directory).
    """
    if stage not in STAGES:
        raise ConfigError(f"stage={stage!r}; expected one of {STAGES}")
    cfg = TrainConfig(stage=stage)
    if path is not None:
        path = Path(path)
        tree = _read_tree(path)  # paths already absolute (each against its own file)
        cfg = _apply(cfg, tree, str(path))
        for name in STAGES:
            overlay = tree.get(name, {})
            if not isinstance(overlay, dict):
                raise ConfigError(f"{path}: [{name}] must be a table")
            if name == stage:
                cfg = _apply(cfg, overlay, f"{path} [{name}]")
            else:
                _check_overlay(overlay, f"{path} [{name}]")
        cfg = dataclasses.replace(cfg, stage=stage)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    for text in overrides:
        keys, value = parse_override(text)
        overlay_stage = keys[0] if keys[0] in STAGES else None
        if overlay_stage is not None:
            keys = keys[1:]
            if not keys:
                raise ConfigError(f"--set {text!r}: a stage overlay needs a key, e.g. {overlay_stage}.optim.lr=1e-4")
        tree: dict = value
        for k in reversed(keys):
            tree = {k: tree}
        if overlay_stage is None or overlay_stage == stage:
            cfg = _apply(cfg, _resolve_paths(tree, base), f"--set {text}")
        else:
            _check_overlay(tree, f"--set {text}")
    if not cfg.init:  # with `init` the model trained is the init model, not cfg.model: preflight checks it
        try:
            check_matryoshka_width(cfg.loss, cfg.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return cfg


def config_from_dict(tree: dict) -> TrainConfig:
    """Inverse of `TrainConfig.to_dict` (used to read WORKDIR/config.json back)."""
    return _apply(TrainConfig(stage=tree.get("stage", "pretrain")), tree, "config.json")

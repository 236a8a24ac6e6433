"""Checks before a run creates anything or compiles anything: every expected error is found here.

`preflight(cfg, workdir)` resolves what a run needs and refuses (UsageError, exit code 2, one line naming
the file, line, key or tensor) what cannot work:

* `--init`: an HF directory, our model directory, a run directory with an export, or a Hugging Face hub
  id (`ORG/NAME[@REVISION]`, from the local cache: `io.hub`); its config.json must agree with the stored
  tensors (sizes are checked from the checkpoint's metadata before any model is built, so an absurd
  `num_hidden_layers` is refused at once);
* the instructions: `data.query_prefix` / `data.passage_prefix` where the config sets them, else the
  --init model's sentence-transformers prompts (config_sentence_transformers.json), else piccolo's;
  the resolved config (WORKDIR/config.json) holds the strings used, and the export writes them as its prompts;
* the tokenizer: `tokenizer` if set, else the --init model's own, else (random init) the bundled
  bert-base-chinese vocabulary; it must fit the model's vocabulary;
* the data: every path exists and holds datasets, every record parses (or is counted with
  skip_bad_records), the sampler can fill a global batch; settings naming datasets that are not there warn;
* the mesh: the devices split as `[parallel]` says and the global batch divides over shards x chunks;
* an existing work directory: the same model shape as the run it holds (other changes warn).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from piccolo_jax.config import TrainConfig, config_from_dict
from piccolo_jax.config.data import PASSAGE_PREFIX, QUERY_PREFIX
from piccolo_jax.config.model import ModelConfig
from piccolo_jax.config.train import check_matryoshka_width
from piccolo_jax.data.loader import Loader
from piccolo_jax.data.records import BadRecord
from piccolo_jax.data.sources import Source, open_sources
from piccolo_jax.io import resources
from piccolo_jax.io.run_dir import UsageError, resolve_model_dir
from piccolo_jax.io.storage import as_path, is_url, local_copy
from piccolo_jax.model.directory import TOKENIZER_FILES
from piccolo_jax.text.tokenizer import Tokenizer

# Architecture fields taken from an --init checkpoint; the run's config keeps dropout / dtype / remat.
ARCH_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id", "add_pooler",
               "pooling", "normalize")
TOKENIZER_MARKERS = ("tokenizer.json", "vocab.txt")
# Fields whose change between two starts of one run is expected (no warning).
_QUIET_FIELDS = {"run.steps", "run.progress_bar", "run.log_every", "init"}


@dataclasses.dataclass
class Preflight:
    """What a run starts from, resolved and checked."""

    cfg: TrainConfig  # with the --init model's architecture and the resolved tokenizer directory
    init_params: Any | None  # host arrays of --init, or None (random init)
    init_note: str  # where the parameters come from, for the log
    tokenizer: Tokenizer
    sources: list[Source]
    loader: Loader  # at the start of the data; the caller restores a checkpoint's position into it
    warnings: list[str]
    notes: list[str]  # informational lines for the log (console and train.log)
    details: list[str] = dataclasses.field(default_factory=list)  # informational lines for train.log only


def model_source(init: str) -> Path:
    """The model directory an --init path stands for (a run directory stands for its export/model)."""
    try:
        path = resolve_model_dir(init)
    except FileNotFoundError as e:
        raise UsageError(f"--init {e}") from None
    if not path.is_dir():
        raise UsageError(f"--init {init}: not a directory (expected an HF directory, a piccolo-jax model "
                         "directory or a run directory)")
    return path


def load_init(init: str, model_cfg: ModelConfig) -> tuple[ModelConfig, Any, str, Path]:
    """(config, host parameters, note, directory) of an --init path; UsageError for anything unusable."""
    from piccolo_jax.hf import ConversionError, load_hf_model
    from piccolo_jax.model.directory import is_model_dir, load_model_dir

    path = model_source(init)
    keep = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in ARCH_FIELDS}
    try:
        if is_model_dir(path):
            cfg, params = load_model_dir(path, **keep)
            return cfg, params, f"piccolo-jax model {path}", path
        if (path / "config.json").is_file():
            cfg, params, report = load_hf_model(local_copy(path), **keep)
            return cfg, params, (f"Hugging Face model {path} (not converted: {report['ignored_head_tensors']} "
                                 f"pre-training head tensors, {report['ignored_buffers']} buffers)"), path
    except (ConversionError, ValueError, OSError) as e:
        raise UsageError(f"--init {init}: {e}") from None
    raise UsageError(f"--init {init}: not an HF directory (config.json + model.safetensors / "
                     "pytorch_model.bin), a piccolo-jax model directory (config.json + params/) or a run "
                     "directory with export/model")


def resolve_tokenizer(cfg: TrainConfig, init_dir: Path | None) -> tuple[str, str]:
    """(tokenizer directory, why that one)."""
    if cfg.tokenizer:
        return cfg.tokenizer, "set by `tokenizer`"
    if init_dir is not None:
        if not any((as_path(init_dir) / f).is_file() for f in TOKENIZER_MARKERS):
            raise UsageError(f"--init {cfg.init}: {init_dir} has no tokenizer ({' or '.join(TOKENIZER_MARKERS)}); "
                             "set tokenizer=DIR to the tokenizer this model was trained with")
        return str(init_dir), "the --init model's own"
    return str(resources.bundled_tokenizer()), "bundled bert-base-chinese vocabulary"


def resolve_prefixes(cfg: TrainConfig, init_dir: Path | None) -> tuple[TrainConfig, str]:
    """(`cfg` with data.query_prefix / passage_prefix set, a note for the log): each where the config sets
    it, else the --init model's sentence-transformers prompt, else piccolo's."""
    from piccolo_jax.hf.prompts import ST_CONFIG, read_prompts

    data, prompts = cfg.data, None
    if init_dir is not None and (data.query_prefix is None or data.passage_prefix is None):
        try:
            prompts = read_prompts(init_dir)
        except ValueError as e:
            raise UsageError(f"--init {cfg.init}: {e}") from None
    default, origin = (prompts, f"the --init model's prompt, {ST_CONFIG}") if prompts is not None else \
        ({"query": QUERY_PREFIX, "passage": PASSAGE_PREFIX}, "piccolo's")
    chosen = {}
    for kind in ("query", "passage"):
        value = getattr(data, f"{kind}_prefix")
        chosen[kind] = (default[kind], origin) if value is None else (value, f"set by data.{kind}_prefix")
    note = "instructions: " + ", ".join(f"{kind} {text!r} ({why})" for kind, (text, why) in chosen.items())
    data = dataclasses.replace(data, query_prefix=chosen["query"][0], passage_prefix=chosen["passage"][0])
    return dataclasses.replace(cfg, data=data), note


def check_tokenizer(tokenizer: Tokenizer, model_cfg: ModelConfig, where: str) -> list[str]:
    """Refuse a tokenizer whose ids do not fit the embedding table; warn when it leaves rows unused."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UsageError(f"{where} has {tokenizer.vocab_size:,} tokens but the model's vocab_size is "
                         f"{model_cfg.vocab_size:,}: ids would index past the embedding table")
    if tokenizer.vocab_size < model_cfg.vocab_size:
        return [f"{where} has {tokenizer.vocab_size:,} tokens, the model {model_cfg.vocab_size:,}: "
                f"{model_cfg.vocab_size - tokenizer.vocab_size:,} embedding rows are never used; make sure the "
                "tokenizer belongs to this model"]
    return []


def compare_with_workdir(cfg: TrainConfig, workdir: Path) -> tuple[list[str], list[str]]:
    """(warnings, notes) about how `cfg` differs from the config of the run already in `workdir`."""
    saved_file = workdir / "config.json"
    if not saved_file.is_file():
        return [], []
    try:
        saved = config_from_dict(json.loads(saved_file.read_text(encoding="utf-8")))
    except Exception as e:  # an older or edited config.json: not fatal, the checkpoint restore decides
        return [f"{saved_file}: cannot be read back ({e}); not compared with this start"], []
    if cfg.stage != saved.stage:
        raise UsageError(f"{workdir} holds a {saved.stage} run; this is --stage {cfg.stage}: use another --workdir")
    arch = [f"{k}: {getattr(saved.model, k)!r} -> {getattr(cfg.model, k)!r}" for k in ARCH_FIELDS
            if getattr(saved.model, k) != getattr(cfg.model, k)]
    if arch:
        raise UsageError(f"{workdir} holds a run of another model shape ({'; '.join(arch)}); use another --workdir")
    old, new = _flat(saved.to_dict()), _flat(cfg.to_dict())
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in _QUIET_FIELDS)
    warnings = [f"this start changes {k}: {old.get(k)!r} -> {new.get(k)!r} (the run in {workdir} used the old value)"
                for k in changed]
    notes = []
    if old.get("run.steps") != new.get("run.steps"):
        notes.append(f"run.steps {old.get('run.steps')} -> {new.get('run.steps')} (the learning-rate schedule "
                     "follows the new length from here on)")
    return warnings, notes


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_data(cfg: TrainConfig, tokenizer: Tokenizer, process_index: int, process_count: int
              ) -> tuple[list[Source], Loader]:
    if not cfg.data.paths:
        raise UsageError("data.paths is empty: set it to JSONL files, directories of them or TFDS datasets, "
                         "e.g. --set 'data.paths=[\"my_data/\"]'")
    try:
        sources = open_sources(cfg.data.paths, cfg.data.record_format, cfg.data.skip_bad_records,
                               cfg.data.max_record_bytes, columns={n: dict(m) for n, m in cfg.data.columns})
        loader = Loader(cfg.data, tokenizer, sources, process_index, process_count)
    except BadRecord as e:
        raise UsageError(str(e)) from None
    except (ValueError, OSError, ImportError) as e:  # ImportError: a TFDS dataset without the tfds extra
        raise UsageError(f"data: {e}") from None
    return sources, loader


def preflight(cfg: TrainConfig, workdir: Path, process_index: int = 0, process_count: int = 1,
              data_parallel: int | None = None) -> Preflight:
    """Resolve and check everything `cfg` names (see the module docstring); nothing is written."""
    warnings, notes, details = [], [], []
    model_cfg, init_params, init_note, init_dir = cfg.model, None, "random init", None
    if cfg.init:
        model_cfg, init_params, init_note, init_dir = load_init(cfg.init, cfg.model)
    try:  # against the model trained: with --init its own width, not the config file's model.hidden_size
        check_matryoshka_width(cfg.loss, model_cfg, "of this model" if cfg.init else "")
    except ValueError as e:
        raise UsageError(f"--init {cfg.init}: {e}" if cfg.init else str(e)) from None
    tokenizer_dir, why = resolve_tokenizer(cfg, init_dir)
    try:
        tokenizer = Tokenizer.from_dir(local_copy(tokenizer_dir, TOKENIZER_FILES))
    except (ValueError, OSError) as e:
        raise UsageError(f"tokenizer: {e}") from None
    warnings += check_tokenizer(tokenizer, model_cfg, f"tokenizer {tokenizer_dir} ({why})")
    details.append(f"tokenizer {tokenizer_dir} ({why}): {tokenizer.vocab_size:,} tokens")
    cfg = dataclasses.replace(cfg, model=model_cfg, tokenizer=tokenizer_dir)
    cfg, prefix_note = resolve_prefixes(cfg, init_dir)
    notes.append(prefix_note)
    if is_url(cfg.run.eval_path):
        raise UsageError(f"run.eval_path {cfg.run.eval_path}: evaluation tasks are read from a local path")
    if cfg.run.eval_path and not os.path.exists(cfg.run.eval_path):
        raise UsageError(f"run.eval_path {cfg.run.eval_path}: no such file or directory")

    from piccolo_jax.model.attention import describe_attention

    try:
        details.append(describe_attention(model_cfg, training=True))
    except ValueError as e:
        raise UsageError(str(e)) from None
    b, chunks = cfg.data.global_batch_size, cfg.loss.num_chunks
    if data_parallel is not None and b % (data_parallel * chunks):
        raise UsageError(f"data.global_batch_size={b} must be divisible by {data_parallel} data shards x "
                         f"{chunks} chunks (loss.num_chunks)")
    sources, loader = open_data(cfg, tokenizer, process_index, process_count)
    warnings += loader.warnings
    more_warnings, more_notes = compare_with_workdir(cfg, workdir)
    return Preflight(cfg, init_params, init_note, tokenizer, sources, loader, warnings + more_warnings,
                     notes + more_notes, details)

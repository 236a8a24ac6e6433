"""The end of a run: WORKDIR/export, written once and atomically, by one process or many.

    export/model/       our model directory (config.json, params/ Orbax arrays, tokenizer files,
                        config_sentence_transformers.json: the run's instructions as prompts)
    export/hf/          HF BertModel + sentence-transformers directory (run.export_hf), with the same
                        prompts: SentenceTransformer(hf).encode_query(q) = Encoder.encode(q, kind="query"),
                        and README.md, the model card (`model_card`)
    export/export.json  {"step": s, "stage": ..., "model": ...}: written last; its presence marks a
                        complete export

Every process takes part (multi-host): the parameters are saved by Orbax from the sharded arrays, each
array written once; process 0 alone writes the small files and the HF copy, then renames
`.export.tmp-<step>` to `export` (the previous export is replaced whole). All processes leave together.
A kill at any moment leaves either the old export or the new one, plus a temporary directory that the
next start removes. On object storage (gs://), which cannot rename, the export is written in place
and export.json marks it complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from piccolo_jax.config import TrainConfig
from piccolo_jax.config.data import PASSAGE_PREFIX, QUERY_PREFIX
from piccolo_jax.hf.prompts import write_prompts
from piccolo_jax.training.model_card import model_card
from piccolo_jax.io.run_dir import EXPORT_DIR, EXPORT_INFO, RunError
from piccolo_jax.io.storage import copy_tree, is_url, local_copy, remove_tree
from piccolo_jax.model.directory import (
    PARAMS_SUBDIR,
    TOKENIZER_FILES,
    apply_umask,
    copy_side_files,
    write_params,
)


def all_finite(params: Any) -> bool:
    """True when every parameter is finite (the same answer on every process)."""
    leaves = jax.tree.leaves(params)
    ok = jax.jit(lambda *xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(*leaves)
    return bool(ok)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def write_export(workdir: Path, cfg: TrainConfig, params: Any, step: int, card: dict | None = None) -> Path:
    """Write WORKDIR/export for the parameters after `step`; returns its path. Call on every process.

    `card`: what the model card (`hf/README.md`, `model_card.model_card`) adds to the config: datasets,
    evaluation, devices, seconds.

    On object storage (no rename) the export is written in place after the previous one is removed;
    export.json, written last, is what makes it complete.
    """
    if not all_finite(params):
        raise RunError(f"the parameters after step {step} are not all finite: no export written "
                       f"(lower optim.lr or check the data)")
    main, url = jax.process_index() == 0, is_url(workdir)
    dest = workdir / EXPORT_DIR
    tmp = dest if url else workdir / f".export.tmp-{step}"
    if main:
        remove_tree(tmp)
        (tmp / "model").mkdir(parents=True, exist_ok=True)
    _sync(f"piccolo-export-begin-{step}")
    write_params(tmp / "model" / PARAMS_SUBDIR, params)
    host = None
    if cfg.run.export_hf:  # every process joins the gather; process 0 writes
        host = multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1 else params
        host = jax.tree.map(lambda x: np.asarray(x, np.float32), host)
    if main:
        tokenizer = local_copy(cfg.tokenizer, TOKENIZER_FILES)
        model_dir = tmp / "model"
        (model_dir / "config.json").write_text(json.dumps(cfg.model.to_hf_dict(), indent=2) + "\n",
                                               encoding="utf-8")
        copy_side_files(tokenizer, model_dir)
        write_prompts(model_dir, *run_prompts(cfg))
        if host is not None:
            readme = model_card(cfg, step, name=workdir.name or "piccolo-jax-model", prompts=run_prompts(cfg),
                                max_seq_length=max(cfg.data.query_max_length, cfg.data.passage_max_length),
                                **(card or {}))
            _write_hf(tmp / "hf", cfg, host, tokenizer, readme)
        info = {"step": step, "stage": cfg.stage, "model": "model", "hf": "hf" if host is not None else None}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if not url:
            apply_umask(tmp)
            if dest.exists():
                old = workdir / f".export.old-{step}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
    _sync(f"piccolo-export-end-{step}")
    return dest


def run_prompts(cfg: TrainConfig) -> tuple[str, str]:
    """(query prefix, passage prefix) of the run: what preflight resolved (piccolo's where still unset)."""
    data = cfg.data
    return (QUERY_PREFIX if data.query_prefix is None else data.query_prefix,
            PASSAGE_PREFIX if data.passage_prefix is None else data.passage_prefix)


def _write_hf(dest, cfg: TrainConfig, host_params: Any, tokenizer: Path, readme: str) -> None:
    from piccolo_jax.hf import write_hf_dir

    max_len = max(cfg.data.query_max_length, cfg.data.passage_max_length)
    options = {"side_files_from": tokenizer, "max_seq_length": max_len, "prompts": run_prompts(cfg)}
    if not is_url(dest):
        write_hf_dir(dest, cfg.model, host_params, **options)
        (Path(dest) / "README.md").write_text(readme, encoding="utf-8")
        return
    with tempfile.TemporaryDirectory(prefix="piccolo-hf-") as local:  # safetensors writes local files
        write_hf_dir(Path(local) / "hf", cfg.model, host_params, **options)
        (Path(local) / "hf" / "README.md").write_text(readme, encoding="utf-8")
        copy_tree(Path(local) / "hf", dest)

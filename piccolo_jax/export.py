"""The end of a run: WORKDIR/export, written once and atomically, by one process or many.

    export/model/       our model directory (config.json, params/ Orbax arrays, tokenizer files)
    export/hf/          HF BertModel + sentence-transformers directory (run.export_hf)
    export/export.json  {"step": s, "stage": ..., "model": ...}: written last; its presence marks a
                        complete export

Every process takes part (multi-host): the parameters are saved by Orbax from the sharded arrays, each
array written once; process 0 alone writes the small files and the HF copy, then renames
`.export.tmp-<step>` to `export` (the previous export is replaced whole). All processes leave together.
A kill at any moment leaves either the old export or the new one, plus a temporary directory that the
next start removes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from piccolo_jax.params_io import PARAMS_SUBDIR, apply_umask, copy_side_files, write_params
from piccolo_jax.run_dir import EXPORT_DIR, EXPORT_INFO, RunError
from piccolo_jax.config import TrainConfig


def all_finite(params: Any) -> bool:
    """True when every parameter is finite (the same answer on every process)."""
    leaves = jax.tree.leaves(params)
    ok = jax.jit(lambda *xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(*leaves)
    return bool(ok)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def write_export(workdir: Path, cfg: TrainConfig, params: Any, step: int) -> Path:
    """Write WORKDIR/export for the parameters after `step`; returns its path. Call on every process."""
    if not all_finite(params):
        raise RunError(f"the parameters after step {step} are not all finite: no export written "
                       f"(lower optim.lr or check the data)")
    main = jax.process_index() == 0
    tmp, dest = workdir / f".export.tmp-{step}", workdir / EXPORT_DIR
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
    _sync(f"piccolo-export-begin-{step}")
    write_params(tmp / "model" / PARAMS_SUBDIR, params)
    host = None
    if cfg.run.export_hf:  # every process joins the gather; process 0 writes
        host = multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1 else params
        host = jax.tree.map(lambda x: np.asarray(x, np.float32), host)
    if main:
        model_dir = tmp / "model"
        (model_dir / "config.json").write_text(json.dumps(cfg.model.to_hf_dict(), indent=2) + "\n",
                                               encoding="utf-8")
        copy_side_files(Path(cfg.tokenizer), model_dir)
        if host is not None:
            from piccolo_jax.hf import write_hf_dir

            write_hf_dir(tmp / "hf", cfg.model, host, side_files_from=cfg.tokenizer,
                         max_seq_length=max(cfg.data.query_max_length, cfg.data.passage_max_length))
        info = {"step": step, "stage": cfg.stage, "model": "model", "hf": "hf" if host is not None else None}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
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

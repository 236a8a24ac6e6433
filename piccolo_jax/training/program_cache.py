"""The train step's traced program kept on disk, so that a restart, a resumed or an extended run skips
tracing and lowering it (seconds per start; XLA's persistent compilation cache then serves the compile).

A program is a serialized `jax.export.Exported` of the step over its flattened arguments, stored as
`<compilation cache>/programs/<key>.exported`. The key is a SHA-256 of everything the program depends on:
the source of every piccolo_jax module, the versions of jax, jaxlib, flax and optax, JAX's numerics
settings, the backend and its devices, the config (all of it but what the step takes as data or never
reads: the `run` section, `optim.lr`, `optim.warmup_steps`), the task type, the argument tree, and each
argument's shape, dtype and sharding. Every program runs through the same path, whether it was just traced
or read back: `jax.jit(Exported.call)` with the step's donation and output shardings, so a resumed run
executes the very program of the run it resumes. An entry that is missing, unreadable or does not match
the arguments is traced again and rewritten (atomically); a step that cannot be exported (one with
custom partitioning, e.g. fused attention on a GPU) runs as `jax.jit` traces it, uncached, with a note.
Single-process runs with a local compilation cache only (`ProgramCache.for_run`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax

from piccolo_jax.training.progress import FILE_ONLY

log = logging.getLogger("piccolo_jax")
SUFFIX = ".exported"
# JAX settings that change what a traced program computes (the rest only change how it is compiled).
NUMERICS_FLAGS = ("jax_default_matmul_precision", "jax_enable_x64", "jax_default_prng_impl",
                  "jax_threefry_partitionable", "jax_numpy_dtype_promotion", "jax_use_shardy_partitioner")


def source_digest() -> str:
    """SHA-256 over the path and bytes of every .py file of the installed piccolo_jax package."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def config_fingerprint(cfg_dict: dict) -> dict:
    """The config as the step's program sees it: without `run` and the learning-rate numbers passed as data."""
    out = {k: v for k, v in cfg_dict.items() if k != "run"}
    out["optim"] = {k: v for k, v in cfg_dict.get("optim", {}).items() if k not in ("lr", "warmup_steps")}
    return out


class ProgramCache:
    """Where a run's step programs are stored, and what besides their arguments they depend on."""

    def __init__(self, directory: str | Path, context: dict):
        self.directory = Path(directory)
        import flax
        import jaxlib
        import optax

        self._context = json.dumps({
            "context": context, "source": source_digest(),
            "versions": [jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__],
            "flags": {name: str(getattr(jax.config, name, None)) for name in NUMERICS_FLAGS},
            "backend": [jax.default_backend(), jax.devices()[0].device_kind, jax.device_count(),
                        jax.process_count()],
        }, sort_keys=True, default=str)

    @classmethod
    def for_run(cls, cfg) -> ProgramCache | None:
        """The run's cache, beside a local XLA compilation cache; None without one (or with a URL for it),
        and None with several processes: two traces of one step serialize to different bytes (names), and
        every process of a run must compile the very same program, which one that read a stored program
        while another traced it would not."""
        directory = jax.config.jax_compilation_cache_dir
        if not directory or jax.process_count() > 1 or "://" in directory:
            return None
        return cls(Path(directory) / "programs", config_fingerprint(cfg.to_dict()))

    def key(self, name: str, treedefs: tuple, avals: list) -> str:
        h = hashlib.sha256(self._context.encode())
        h.update(json.dumps([name, [str(t) for t in treedefs], avals]).encode())
        return h.hexdigest()

    def load(self, key: str) -> bytes | None:
        try:
            return (self.directory / f"{key}{SUFFIX}").read_bytes()
        except OSError:
            return None

    def store(self, key: str, blob: bytes) -> bool:
        """Atomically (a temporary file renamed into place); False, with a warning, when it cannot be written."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.directory / f"{key}{SUFFIX}")
            return True
        except OSError as e:
            log.warning("the program cache %s cannot be written (%s): the step is traced at every start",
                        self.directory, e.strerror or e)
            return False


def _aval(x: Any) -> list:
    """Shape, dtype and placement of an argument: a committed array's sharding (mesh axes, device order,
    partition spec), an uncommitted one's none (jit places it)."""
    sharding = getattr(x, "sharding", None)
    committed = getattr(x, "committed", True)
    placed = None
    if sharding is not None and committed:
        mesh = getattr(sharding, "mesh", None)
        devices = [d.id for d in mesh.devices.flat] if mesh is not None else sorted(d.id for d in sharding.device_set)
        placed = [repr(sharding), devices]
    return [list(x.shape), str(x.dtype), placed]


def step_description(model_cfg, loss_cfg, strategy: str) -> dict:
    """What `make_train_step` builds a step from, besides the optimizer (the run's, in the cache's context):
    the memory check builds steps of other `loss.num_chunks` than the run's config names."""
    return {"model": dataclasses.asdict(model_cfg), "loss": dataclasses.asdict(loss_cfg), "strategy": strategy}


class CachedStep:
    """`make_train_step`'s jitted step behind the program cache: called as the step is,
    `(state, batch, key, task=..., lr_values=...) -> (state, metrics)`, donating `state`. `built_from`
    (`step_description`) joins the key: one cache serves steps built from other configs."""

    def __init__(self, step: Callable, cache: ProgramCache, metrics_sharding: Any, built_from: dict):
        self._step, self._cache, self._metrics_sharding = step, cache, metrics_sharding
        self._built_from = json.dumps(built_from, sort_keys=True, default=str)
        self._programs: dict = {}
        self.loaded: list[str] = []  # "read" or "traced" per program, in the order they were first needed

    def __call__(self, state, batch, key, task: str = "retrieval", lr_values=None):
        program, state_def, args = self._prepare(state, batch, key, task, lr_values)
        state_leaves, metrics = program(*args)
        return jax.tree.unflatten(state_def, state_leaves), metrics

    def lower(self, state, batch, key, task: str = "retrieval", lr_values=None):
        """The program for these (possibly abstract) arguments, lowered: `.compile()` gives what the loop runs."""
        program, _, args = self._prepare(state, batch, key, task, lr_values)
        return program.lower(*args)

    def _prepare(self, state, batch, key, task, lr_values):
        state_leaves, state_def = jax.tree.flatten(state)
        batch_leaves, batch_def = jax.tree.flatten(batch)
        args = [*state_leaves, *batch_leaves, jax.random.key_data(key), lr_values]
        signature = (task, state_def, batch_def, tuple(
            (a.shape, a.dtype, a.sharding if getattr(a, "committed", True) else None) for a in args))
        program = self._programs.get(signature)
        if program is None:
            program = self._programs[signature] = self._program(task, state_def, batch_def, args)
        return program, state_def, args

    def key(self, task: str, state_def, batch_def, args: list) -> str:
        return self._cache.key(f"train_step/{task}/{self._built_from}", (state_def, batch_def),
                               [_aval(a) for a in args])

    def _program(self, task, state_def, batch_def, args):
        n_state, n_batch = state_def.num_leaves, batch_def.num_leaves
        step = self._step

        def flat(*leaves):
            state = jax.tree.unflatten(state_def, leaves[:n_state])
            batch = jax.tree.unflatten(batch_def, leaves[n_state:n_state + n_batch])
            step_key = jax.random.wrap_key_data(leaves[n_state + n_batch])
            new_state, metrics = step(state, batch, step_key, task=task, lr_values=leaves[-1])
            return jax.tree.leaves(new_state), metrics

        key = self.key(task, state_def, batch_def, args)
        blob = self._cache.load(key)
        exported = _deserialize(blob, args) if blob is not None else None
        if exported is not None:
            log.info("train step for %s batches: traced program read from %s", task, self._cache.directory,
                     extra=FILE_ONLY)
            self.loaded.append("read")
        else:
            abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding
                                             if getattr(a, "committed", True) else None) for a in args]
            try:
                blob = jax.export.export(jax.jit(flat))(*abstract).serialize()
            except Exception as e:  # e.g. custom partitioning (fused attention on a GPU) does not export
                log.info("train step for %s batches: not kept in the program cache (%s: %s)", task,
                         type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                self.loaded.append("uncached")
                return jax.jit(flat, donate_argnums=tuple(range(n_state)))
            if self._cache.store(key, blob):
                log.info("train step for %s batches: traced; kept in %s for the next start", task,
                         self._cache.directory, extra=FILE_ONLY)
            exported = jax.export.deserialize(bytearray(blob))  # the bytes a later start reads: one program
            self.loaded.append("traced")
        state_shardings = [a.sharding for a in args[:n_state]]
        return jax.jit(exported.call, donate_argnums=tuple(range(n_state)),
                       out_shardings=(state_shardings, self._metrics_sharding))


def _deserialize(blob: bytes, args: list):
    """The stored program, or None when it does not read back or does not take these arguments."""
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except Exception:  # a truncated or foreign file: traced again and overwritten
        return None
    if [(tuple(a.shape), str(a.dtype)) for a in exported.in_avals] != [(tuple(a.shape), str(a.dtype))
                                                                         for a in args]:
        return None
    return exported


def wrap_step(step: Callable, cache: ProgramCache | None, metrics_sharding: Any, built_from: dict) -> Callable:
    """The step behind the program cache when there is one (and the step can be exported), else as it is."""
    return step if cache is None else CachedStep(step, cache, metrics_sharding, built_from)

"""A run directory's life: its layout, its lock, its state, and how a run ends (one exit code per ending).

    WORKDIR/
      config.json        the resolved config of the latest start
      train.log          every start's log, appended (process 0)
      metrics.jsonl      one JSON object per logged step; tb/ the same as TensorBoard events (a resumed
                         run drops what an interrupted one logged after its checkpoint: each step once)
      checkpoints/<s>/   Orbax checkpoints: train state + data-loader position after step s
      export/            written once the last step is done, atomically as a whole:
        model/  hf/      our model directory and an HF + sentence-transformers directory
        export.json      {"step": s, ...}: which step the export holds
      .lock              {"host", "pid", "started"} of the trainer using the directory

A run is in one of these states, and a start of the same command does what the table says:

    fresh        no checkpoint                         train from step 0 (or --init)
    partial      latest checkpoint s < run.steps        resume at s: same batches, same dropout keys
    trained      checkpoint at run.steps, no export     write the export (nothing is trained)
                 (or an export of another step)
    complete     export of step run.steps               say so, exit 0; nothing is written
    beyond       latest checkpoint s > run.steps        refuse (exit 2): raise run.steps or use a new workdir

Every ending goes through one exit code:

    0  done: complete, or stopped on request (SIGINT / SIGTERM) with a checkpoint of the last step
    1  failure: a failed save, non-finite training, a lost peer process, an unexpected error
    2  bad configuration, bad input, or a work directory in use by another trainer
    128 + N: killed by signal N (kill -9 = 137); the run resumes from its latest checkpoint
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from piccolo_jax.io.hub import resolve_model_path
from piccolo_jax.io.storage import as_path, is_url, remove_tree

log = logging.getLogger("piccolo_jax")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXPORT_DIR, EXPORT_INFO, LOCK_FILE = "export", "export.json", ".lock"
# Temporary directories of writes that a kill can interrupt: exports (.export.tmp-<step>), model
# directories written by `params_io.atomic_directory` (.model.tmp-*, .hf.tmp-*) and renamed-away old exports.
_TEMPORARY_PREFIXES = (".export.tmp-", ".export.old-", ".model.tmp-", ".hf.tmp-")
LOCK_REFRESH_S = 10.0  # the holder touches the lock this often
LOCK_STALE_S = 60.0  # a lock of another host untouched this long belongs to a dead trainer


class RunError(Exception):
    """An expected way for a run to fail: a one-line message and its exit code (no traceback)."""

    code = EXIT_FAILURE

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(RunError):
    """Bad configuration or input, found before anything is trained: exit code 2."""

    code = EXIT_USAGE


# ------------------------------------------------------------------------------------------------- state
def export_step(workdir: Path) -> int | None:
    """The step held by WORKDIR/export, or None when there is no (complete) export."""
    info = workdir / EXPORT_DIR / EXPORT_INFO
    try:
        return int(json.loads(info.read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_run_dir(path) -> bool:
    path = as_path(path)
    return any((path / name).exists() for name in ("checkpoints", "train.log", EXPORT_DIR))


def resolve_model_dir(path) -> Path:
    """The model directory a path stands for: a run directory stands for its complete export's model/, a
    Hugging Face hub id (`ORG/NAME[@REVISION]`, not a local path) for its snapshot in the local cache
    (`piccolo_jax.io.hub`: downloaded first when online).

    Raises FileNotFoundError with one line for a missing path, a hub id that cannot be had, and a run
    without a complete export.
    """
    path = as_path(resolve_model_path(path))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory")
    if is_run_dir(path):
        if export_step(path) is None:
            raise FileNotFoundError(f"{path}: a run directory without an export ({last_checkpoint_note(path)}); "
                                    "rerun its own train command to finish it")
        return path / EXPORT_DIR / "model"
    return path


def run_state(latest_checkpoint: int | None, exported: int | None, steps: int) -> str:
    """One of fresh / partial / trained / complete / beyond (see the module docstring)."""
    if latest_checkpoint is None:
        return "fresh"
    if latest_checkpoint > steps:
        return "beyond"
    if latest_checkpoint < steps:
        return "partial"
    return "complete" if exported == steps else "trained"


def clean_temporaries(workdir: Path) -> list[str]:
    """Remove what killed exports left behind; returns the names removed. Call only while holding the lock."""
    removed = []
    for path in [workdir, workdir / EXPORT_DIR]:
        if not path.is_dir():
            continue
        for entry in path.iterdir():
            if entry.name.startswith(_TEMPORARY_PREFIXES):
                remove_tree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed.append(f"{path.name + '/' if path != workdir else ''}{entry.name}")
    return removed


def checkpoint_complete(step_dir) -> bool:
    """A finished Orbax checkpoint: renamed to its step number locally; on object storage (no rename)
    the step directory exists early and Orbax writes commit_success.txt last."""
    if not step_dir.name.isdigit():
        return False
    return not is_url(step_dir) or (step_dir / "commit_success.txt").exists()


def last_checkpoint_note(workdir: Path) -> str:
    """'last checkpoint: step s (WORKDIR/checkpoints/s)' from the directory alone (no Orbax, no JAX)."""
    ckpt = as_path(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt.iterdir() if checkpoint_complete(p)) if ckpt.exists() else []
    if not steps:
        return "no checkpoint yet (a rerun starts from the beginning)"
    return f"last checkpoint: step {steps[-1]} ({ckpt / str(steps[-1])})"


# -------------------------------------------------------------------------------------------------- lock
def _pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs. A zombie (killed, not yet reaped: kill -9 in a container
    whose init does not reap) answers os.kill like a live process but is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[-1].split()[0]  # the field after "(command)"
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


class WorkdirLock:
    """`WORKDIR/.lock`: one trainer per work directory.

    Taken with O_EXCL; its holder refreshes the file's mtime every LOCK_REFRESH_S. A second trainer finds
    the lock held when its host is this host and its PID is alive, or (another host) when it was refreshed
    less than LOCK_STALE_S ago; it then refuses, naming the holder. A lock of a dead process is taken over.
    """

    def __init__(self, workdir: Path):
        self.path = as_path(workdir) / LOCK_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: half-written by a trainer that died while taking it

    def _is_live(self, holder: dict) -> bool:
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            return _pid_alive(holder["pid"])
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        return time.time() - getattr(stat, "st_mtime", getattr(stat, "mtime", 0)) < LOCK_STALE_S

    def acquire(self) -> None:
        if is_url(self.path):
            return self._acquire_object()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if self._is_live(holder):
                    raise UsageError(
                        f"{self.path.parent} is in use by another trainer: host {holder.get('host')}, "
                        f"pid {holder.get('pid')}, started {holder.get('started')}; stop it or use another "
                        "--workdir", EXIT_USAGE)
                log.warning("taking over the stale lock %s of host %s, pid %s (no longer running)", self.path,
                            holder.get("host"), holder.get("pid"))
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise RunError(f"cannot create the lock {self.path}: {e.strerror or e}") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.me, f)
            self._thread = threading.Thread(target=self._refresh, name="piccolo-lock", daemon=True)
            self._thread.start()
            return
        raise RunError(f"could not take the lock {self.path} (it keeps changing)")

    def _acquire_object(self) -> None:
        """Object storage has no exclusive create: the lock there is advisory (two trainers started within
        the same second can both pass); a live holder is one whose object is fresh or whose PID lives here."""
        holder = self._holder()
        if holder is not None and self._is_live(holder):
            raise UsageError(f"{self.path.parent} is in use by another trainer: host {holder.get('host')}, pid "
                             f"{holder.get('pid')}, started {holder.get('started')}; stop it or use another --workdir")
        if holder is not None:
            log.warning("taking over the stale lock %s of host %s, pid %s (no longer running)", self.path,
                        holder.get("host"), holder.get("pid"))
        self.path.write_text(json.dumps(self.me), encoding="utf-8")
        self._thread = threading.Thread(target=self._refresh, name="piccolo-lock", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            try:
                if is_url(self.path):
                    self.path.write_text(json.dumps(self.me), encoding="utf-8")  # objects have no utime
                else:
                    os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._holder() == self.me:
                self.path.unlink(missing_ok=True)

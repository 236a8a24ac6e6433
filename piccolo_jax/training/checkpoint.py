"""Training checkpoints: Orbax CheckpointManager behind save / restore_latest / latest_step.

A checkpoint at step s holds the train state (params, optimizer state, step, skipped count) and the
data loader's state after batch s, so a restart continues with batch s + 1 and the same dropout keys
(the key of step s is fold_in(key(seed), s); the seed is in the config). Orbax writes each checkpoint
to a temporary directory and renames it when complete, so a process killed during a save leaves the
previous checkpoint intact.

Each checkpoint also holds a checksum of every array of the state (`parallel.array_digest`, computed on the
devices at save time) and is verified against it when restored: a damaged file (a flipped block on disk,
a bad copy) is found at restore, not as a training failure later. A checkpoint that cannot be read or
does not verify is skipped with one warning line and the one before is restored; the damaged step is
replaced when the run reaches it again.

A step is saved at most once (a periodic save and the save of a stop request can name the same step).
A save that fails (read-only directory, full disk) raises `CheckpointError`: one line with the reason,
the path and the last good checkpoint, at the step of the save (the directory is probed for writing before
each asynchronous save starts; a failure inside the background write is raised by `check`, called after
every step). Orbax reports such failures from its background threads, which may not finish afterwards: a
process that got a CheckpointError should leave with `os._exit`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from piccolo_jax.io.run_dir import RunError, checkpoint_complete
from piccolo_jax.io.storage import as_path, ocdbt_supported
from piccolo_jax.parallel.array_digest import digest_mismatch, tree_digest

log = logging.getLogger(__name__)


class CheckpointError(RunError):
    """A checkpoint could not be written (or none of the existing ones could be read)."""


class DamagedCheckpoint(Exception):
    """A checkpoint read back whole whose arrays differ from the checksum written with them."""


def _quiet_closed_loop_reports() -> None:
    """When a save fails (full disk), Orbax's save thread ends its event loop while tensorstore still
    completes the other writes of that save; each completion finds the loop closed and reports it as an
    unraisable exception: dozens of identical tracebacks on stderr, echoes of the one failure the trainer
    reports in one line. Drop exactly those (installed once per process), keep every other report."""
    previous = sys.unraisablehook
    if getattr(previous, "quiet_closed_loop", False):
        return

    def hook(unraisable):
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.quiet_closed_loop = True
    sys.unraisablehook = hook


def error_reason(e: BaseException) -> str:
    """The cause of an I/O failure in one line: errno text and path for OSError, else the first line."""
    while e.__cause__ is not None and not isinstance(e, OSError):
        e = e.__cause__
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    code = re.search(r"os_error_code='(\d+)'", text)  # tensorstore wraps the OS error in a long message
    if code:
        path = re.search(r'Failed (?:writing|reading|to open)[^"]*"([^"]+)"', text) or re.search(
            r'local file "([^"]+)"', text)
        return os.strerror(int(code.group(1))) + (f": {path.group(1)}" if path else "")
    return text if len(text) <= 400 else text[:400] + "..."


class Checkpointer:
    """Periodic asynchronous checkpoints of (train state, loader state) in `directory`."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        handlers = None if ocdbt_supported(self.directory) else {
            "state": ocp.StandardCheckpointHandler(use_ocdbt=False), "data": ocp.JsonCheckpointHandler(),
            "digest": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._last_started: int | None = None  # step of the latest save started
        self._broken = False  # a save failed (see close)
        self._damaged: set[int] = set()  # steps found damaged at restore: replaced when saved again
        _quiet_closed_loop_reports()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def saved_steps(self) -> list[int]:
        """Steps whose checkpoint is complete (see run_dir.checkpoint_complete)."""
        if not self.directory.exists():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if checkpoint_complete(p))

    def _failed(self, step: int, e: BaseException) -> CheckpointError:
        self._broken = True
        done = [s for s in self.saved_steps() if s != step]
        last = f"step {done[-1]} ({self.directory / str(done[-1])})" if done else "none"
        return CheckpointError(f"saving the checkpoint of step {step} to {self.directory} failed: "
                               f"{error_reason(e)}; last good checkpoint: {last}")

    def save(self, step: int, state: Any, loader_state: dict, force: bool = False) -> bool:
        """Start an asynchronous save (returns at once; the previous save is finished first).

        Returns False, saving nothing, when `step` is already saved or being saved.
        """
        if step in self._damaged:  # this run computed that step anew: the damaged copy goes
            self._manager.delete(step)
            self._damaged.discard(step)
        if step in self._manager.all_steps():
            return False
        try:
            self._probe()
        except OSError as e:
            raise self._failed(step, e) from None
        digest = tree_digest(state)  # waits for the step that produced `state`
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(loader_state),
                                  digest=ocp.args.JsonSave(digest))
        try:
            return self._manager.save(step, args=args, force=force)
        except Exception as e:  # the previous async save failed, or this one could not start
            raise self._failed(step if self._last_started is None else self._last_started, e) from None
        finally:
            self._last_started = step

    def _probe(self) -> None:
        """Fail now, at the step of the save, where the directory cannot be written (read-only, full):
        Orbax would report it from its background thread at the next save."""
        probe = self.directory / f".write-probe-{jax.process_index()}-{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as e:  # named by the directory, not the probe's file name
            raise OSError(e.errno, e.strerror, str(self.directory)) from None

    def check(self) -> None:
        """Raise CheckpointError if the last asynchronous save has ended in failure (cheap: never waits).
        Orbax reports a failed save only when waited for; a finished one is waited for at no cost."""
        if self._last_started is None or self._broken:
            return
        try:
            self._manager.check_for_errors()
            if not self._manager.is_saving_in_progress():
                self._manager.wait_until_finished()  # returns at once, or raises the save's failure
        except Exception as e:
            raise self._failed(-1 if self._last_started is None else self._last_started, e) from None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, loader_state) of `step`, verified against its checksum (DamagedCheckpoint if it differs;
        checkpoints written before checksums existed are not verified); `abstract_state` carries the target
        shardings."""
        verify = (self.directory / str(step) / "digest").exists()
        items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        if verify:
            items["digest"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if verify:
            problem = digest_mismatch(restored.digest, tree_digest(restored.state))
            if problem:
                raise DamagedCheckpoint(problem)
        return restored.state, restored.data

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """Newest readable checkpoint as (step, state, loader_state), or None if there is none.

        A checkpoint that fails to restore (truncated file, corrupt metadata) or to verify (content
        changed since it was written) is skipped with a warning and the one before it is tried.
        """
        errors = []
        for step in reversed(self.steps()):
            try:
                state, data = self.restore(step, abstract_state)
                return step, state, data
            except Exception as e:  # Orbax / tensorstore raise many types for damaged files
                errors.append((step, e))
                self._damaged.add(step)
                what = "is damaged" if isinstance(e, DamagedCheckpoint) else f"is unreadable ({type(e).__name__})"
                log.warning("checkpoint %s/%d %s: %s; trying the one before (step %d is written anew when the run "
                            "reaches it)", self.directory, step, what, error_reason(e), step)
        if errors:
            step, e = errors[0]
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored (steps "
                                  f"{[s for s, _ in errors]}); the latest, step {step}: {error_reason(e)}")
        return None

    def wait(self) -> None:
        """Block until the last save is on disk (raises CheckpointError if it failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._failed(-1 if self._last_started is None else self._last_started, e) from None

    def close(self) -> None:
        """Finish the last save and release Orbax's threads. After a failed save this does nothing: Orbax's
        writes may still be failing in the background, and closing its event loop under them prints their
        errors; the process is about to leave with `os._exit` anyway."""
        if self._broken:
            return
        try:
            self.wait()
        finally:
            if not self._broken:
                self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree` (restore targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

"""Training checkpoints: Orbax CheckpointManager behind save / restore_latest / latest_step.

A checkpoint at step s holds the train state (params, optimizer state, step, skipped count) and the
data loader's state after batch s, so a restart continues with batch s + 1 and the same dropout keys
(the key of step s is fold_in(key(seed), s); the seed is in the config). Orbax writes each checkpoint
to a temporary directory and renames it when complete, so a process killed during a save leaves the
previous checkpoint intact; an unreadable latest checkpoint falls back to the one before, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Periodic asynchronous checkpoints of (train state, loader state) in `directory`."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, loader_state: dict, force: bool = False) -> bool:
        """Start an asynchronous save (returns at once); the previous save is finished first."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(loader_state))
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, loader_state) of `step`; `abstract_state` carries the target shardings."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored.state, restored.data

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """Newest readable checkpoint as (step, state, loader_state), or None if there is none.

        A checkpoint that fails to restore (truncated file, corrupt metadata) is skipped with a warning
        and the one before it is tried.
        """
        for step in reversed(self.steps()):
            try:
                state, data = self.restore(step, abstract_state)
                return step, state, data
            except Exception as e:  # Orbax / tensorstore raise many types for damaged files
                log.warning("checkpoint %s/%d is unreadable (%s: %s); falling back to the previous one",
                            self.directory, step, type(e).__name__, str(e).splitlines()[0][:300])
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree` (restore targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

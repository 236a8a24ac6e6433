"""Directories built aside and renamed into place, so that readers see the old one or the new one.

    tmp, lock = claim(OUT, "city_qa")        # OUT/.piccolo-tmp-city_qa-<random>/, locked with flock
    ...build tmp/city_qa/1.0.0...
    replace_dir(tmp + "/city_qa/1.0.0", OUT + "/city_qa/1.0.0")
    remove_stale(OUT)                         # deletes .piccolo-tmp-* whose lock no process holds

`replace_dir` renames an existing target to OUT/<name>/.piccolo-old-<random> first, renames the new
directory into place (atomic on one file system), then deletes the old one; a process killed between
the two renames leaves that hidden directory, deleted by the next replace_dir in the same place. The
flock of `claim` is released by the kernel however its process ends, which is how a later run tells
a killed run's leftovers from a running one's.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil

log = logging.getLogger(__name__)
PREFIX = ".piccolo-tmp-"
OLD_PREFIX = ".piccolo-old-"


def claim(output: str, name: str) -> tuple[str, int]:
    """A new OUT/.piccolo-tmp-<name>-<random>/ and an open descriptor holding its lock (flock), which
    the kernel releases when this process ends in any way, so that a later run can tell it is stale."""
    tmp = os.path.join(output, f"{PREFIX}{name}-{secrets.token_hex(4)}")
    os.makedirs(os.path.join(tmp, "parts"))
    fd = os.open(os.path.join(tmp, ".lock"), os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return tmp, fd


def remove_stale(output: str) -> None:
    """Delete the temporary directories of prepare runs that were killed (their lock is free)."""
    if not os.path.isdir(output):
        return
    for entry in sorted(os.listdir(output)):
        path = os.path.join(output, entry)
        if not entry.startswith(PREFIX) or not os.path.isdir(path):
            continue
        try:
            fd = os.open(os.path.join(path, ".lock"), os.O_RDWR)
        except FileNotFoundError:  # killed before it took the lock
            fd = None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another prepare is using it
            continue
        finally:
            if fd is not None:
                os.close(fd)
        log.warning("removing %s, left by an interrupted prepare", path)
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(new: str, final: str) -> None:
    """Rename directory `new` to `final`, moving an existing `final` aside first and deleting it after."""
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    for entry in os.listdir(parent):  # left by a run killed between the two renames below
        if entry.startswith(OLD_PREFIX):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    old = None
    if os.path.exists(final):
        old = os.path.join(parent, f"{OLD_PREFIX}{secrets.token_hex(4)}")
        os.rename(final, old)
    try:
        os.rename(new, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

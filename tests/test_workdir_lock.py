"""WORKDIR/.lock between hosts: a lock that another host refreshed recently is live and refused; one left
untouched for LOCK_STALE_S belongs to a dead trainer and is taken over. (Same-host locks are decided by
the PID and covered through the CLI in test_lifecycle.py.)"""

from __future__ import annotations

import json
import os
import time

import pytest

from piccolo_jax.io.run_dir import LOCK_FILE, LOCK_STALE_S, UsageError, WorkdirLock

OTHER_HOST = {"host": "node-7.cluster.invalid", "pid": 4242, "started": "2026-01-01 00:00:00"}


def _lock_of_another_host(workdir, age_s: float):
    path = workdir / LOCK_FILE
    path.write_text(json.dumps(OTHER_HOST), encoding="utf-8")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_fresh_lock_of_another_host_is_refused(tmp_path):
    path = _lock_of_another_host(tmp_path, age_s=LOCK_STALE_S / 4)  # refreshed 15 s ago: its trainer lives
    with pytest.raises(UsageError, match="in use by another trainer: host node-7.cluster.invalid, pid 4242"):
        WorkdirLock(tmp_path).acquire()
    assert json.loads(path.read_text()) == OTHER_HOST  # untouched


def test_a_stale_lock_of_another_host_is_taken_over(tmp_path, caplog):
    path = _lock_of_another_host(tmp_path, age_s=LOCK_STALE_S * 2)
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    try:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert "taking over the stale lock" in caplog.text and "node-7.cluster.invalid" in caplog.text
    finally:
        lock.release()
    assert not path.exists()

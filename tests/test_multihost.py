"""Two processes x 4 CPU devices compute the train step of one process x 8 devices, padded and packed.

The test starts two copies of `multihost_worker.py` joined by `jax.distributed` on 127.0.0.1 (gloo
collectives between the processes); each passes only its own half of the global batch, padded and then
packed by itself into shapes both derive alike. The in-process 8-device padded run of the same `run` is
the reference of both (itself checked against one device in test_train_step).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from trainer_cli import xla_flags

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 300  # start-up, compile and one step of both workers, on a loaded 2-core machine


def load_worker():
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs, deadline: float) -> None:
    """Wait for every process; stop at the first failure or at the deadline (the caller kills the rest)."""
    while any(p.poll() is None for p in procs):
        if any(p.returncode for p in procs):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers still running after {TIMEOUT_S} s")
        time.sleep(0.2)


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_two_processes_match_one_process(tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    deadline = time.monotonic() + TIMEOUT_S
    port = free_port()
    procs = []
    try:
        for i in range(2):
            with open(tmp_path / f"worker_{i}.log", "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), str(i), "2", str(port), str(tmp_path)],
                    env=env, stdout=log, stderr=subprocess.STDOUT))
        # The one-process reference runs while the workers start.
        worker = load_worker()
        expected = worker.run(worker.make_mesh(worker.MESH, jax.devices()))
        wait_all(procs, deadline)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if len(procs) < 2 or any(p.returncode for p in procs):
            for i, p in enumerate(procs):
                sys.stderr.write(f"--- worker {i} (exit {p.returncode}) ---\n"
                                 + (tmp_path / f"worker_{i}.log").read_text()[-20_000:])
    assert [p.returncode for p in procs] == [0, 0], "a worker failed; its output is above"

    results = [dict(np.load(tmp_path / f"{kind}_{i}.npz")) for kind in ("result", "packed") for i in range(2)]
    # Each process passed its own half of the 16 rows, padded and then packed (its rows only).
    assert [list(r.pop("rows")) for r in results] == [[0, 8], [8, 16]] * 2
    assert list(expected.pop("rows")) == [0, 16]
    assert int(expected["step"]) == 1 and int(expected["skipped"]) == 0
    assert results[0].keys() == expected.keys() and len(expected) > 40
    # Gradients (g = mu / (1 - b1)): rtol, plus an atol for entries that are ~0 or cancel to rounding level
    # (3e-6 x the tensor's largest entry, 1e-9 x the largest of all), as in test_train_step.
    b1, lr, eps = worker.OPT.b1, worker.OPT.lr, worker.OPT.eps
    grads = {k.replace("['mu']", "", 1): np.abs(v) / (1 - b1) for k, v in expected.items() if k.startswith("['mu']")}
    g_max = max(g.max() for g in grads.values())
    for name, want in expected.items():
        atol = 0.0
        if name.startswith(("['mu']", "['params']")):
            g = grads[name.split("]", 1)[1]]
            g_atol = 3e-6 * g.max() + 1e-9 * g_max
            # One AdamW step moves an entry by ~lr * g / (|g| + eps): an error e in g moves it by at most
            # lr * e / (|g| + eps).
            atol = (1 - b1) * g_atol if name.startswith("['mu']") else (
                1e-7 + lr * np.minimum(2.0, (1e-5 * g + g_atol) / (g + eps)))
        for i, r in enumerate(results):
            err = np.abs(r[name] - want)
            assert np.all(err <= atol + 1e-5 * np.abs(want)), (f"process {i}: {name}", float(err.max()))

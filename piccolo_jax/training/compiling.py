"""Compiling the train step before the first step: every task type's program up front, and without XLA's
"Very slow compile?" alarm on the console.

A run whose datasets have several task types (retrieval, sts, classification) trains one program per
type. Compiled as each type's first batch comes, they compile one after another with steps in between;
`compile_ahead` instead lowers each (tracing holds the GIL: one at a time, seconds) and compiles them on
threads, several at once where there are cores for it (`compile_workers`; XLA compiles without the GIL;
the first compiles while the next is traced), before the first step, from the first batch of each type
(`Loader.first_batch_of_each_task`). The step's calls then find them compiled: a jitted function's
lowering is cached, and its compiled executable with it. (Cheaper CPU code generation, the tests' LLVM -O0 flags, halves the compile of the
tiny configs but makes their steps about 7x slower: not used.)

XLA logs an alarm from C++ when a compile takes over two minutes (a busy or small CPU): an ERROR-level
block ending "Very slow compile? If you want to file a bug, run with envvar XLA_FLAGS=--xla_dump_to=...".
There is no setting that silences that one message: TF_CPP_MIN_LOG_LEVEL (and absl's stderr threshold)
cut by severity, and 3 would hide every real error too. `quiet_compile_alarms` passes the process's
stderr (file descriptor 2, where C++ writes) through a small filter process that drops those blocks and
forwards everything else as it comes; being another process, it still forwards what a crash writes last.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

# The filter: stdin -> stdout, everything as it comes but the compile alarm of XLA's
# xla/service/slow_operation_alarm.cc: a log line naming that file, lines of stars, the message with
# "Very slow compile?", a closing line of stars. The lines after such a header are held back until that
# message is seen (then dropped with the header and the stars); a block without it within 8 lines (another
# alarm of that file: constant folding) is forwarded whole. A partial line is forwarded when no more input
# is waiting (a prompt, progress output).
_FILTER = r"""
import os, select, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
def out(data):
    while data:
        data = data[os.write(1, data):]
def stars(line):
    line = line.strip()
    return line != b"" and line.strip(b"*") == b""
pending, held, dropping_stars = b"", None, False
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    pending += chunk
    *lines, pending = pending.split(b"\n")
    keep = []
    for line in lines:
        line += b"\n"
        if held is not None:
            held.append(line)
            if b"Very slow compile?" in line:
                held, dropping_stars = None, True
            elif len(held) > 8:
                keep += held
                held = None
        elif b"slow_operation_alarm" in line:
            held = [line]
        elif dropping_stars and stars(line):
            dropping_stars = False
        else:
            dropping_stars = False
            keep.append(line)
    if pending and held is None and not select.select([0], [], [], 0.05)[0]:
        keep.append(pending)
        pending = b""
    out(b"".join(keep))
out(b"".join(held or []) + pending)
"""


@contextlib.contextmanager
def quiet_compile_alarms() -> Iterator[None]:
    """Within the block, XLA's slow-compile alarms do not reach stderr (everything else does, in order).
    A no-op where stderr is not a file descriptor, off POSIX, or with PICCOLO_JAX_XLA_ALARMS=1."""
    if os.name != "posix" or os.environ.get("PICCOLO_JAX_XLA_ALARMS") == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        read, write = os.pipe()
        child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER], stdin=read, stdout=saved,
                                 stderr=saved, start_new_session=True, close_fds=True)
    except OSError:
        os.close(saved)
        yield
        return
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # the pipe's last write end closes: the filter forwards what is left and ends
        os.close(saved)
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()


def compile_ahead(step_fn, state, batches: dict[str, dict], key, lr_values, workers: int | None = None) -> float:
    """Compile `step_fn` for each task's batch in `batches` ({task: global arrays}), `workers` at a time
    (default `compile_workers`); returns the seconds it took. Each program is lowered here (tracing holds
    the GIL) while the ones before it compile on the workers. `step_fn` is the loop's step (a jitted
    function or a program_cache.CachedStep): what it lowers and compiles here, its calls reuse."""
    t0 = time.perf_counter()
    workers = max(1, min(len(batches), workers or compile_workers()))
    with concurrent.futures.ThreadPoolExecutor(workers, "piccolo-compile") as pool:
        compiled = [pool.submit(step_fn.lower(state, batch, key, task=task, lr_values=lr_values).compile)
                    for task, batch in batches.items()]
        for future in compiled:
            future.result()
    return time.perf_counter() - t0


def compile_workers() -> int:
    """Programs compiled at once: one per two cores of this process. XLA's CPU compiler already keeps
    about a core and a quarter busy with one program (its parallel code generation): on 2 cores, a run of
    `--config tiny_v2` compiling its three programs two at a time took as long as one compiling them one
    after another (109 s against 107 s of the whole run, the mean of two runs each), for 25 % more CPU
    time."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)

"""Multi-process runs: the command-line flags, starting `jax.distributed`, and gathering rows.

Every command that can span processes (train, encode, evaluate, mine) takes the same flags:

    --coordinator HOST:PORT --num-processes N --process-id I

or detects a cluster (SLURM with more than one task, Cloud TPU, JAX_COORDINATOR_ADDRESS). CPU processes
talk over TCP (gloo collectives). A process that sends no heartbeat for `heartbeat_timeout_s` seconds is
dead; the distributed service then stops the others (no process waits forever for a lost peer). The
inference commands run under a small supervisor (`run_command`), which outlives that stop (SIGABRT from
C++), removes the temporary outputs and prints one line.

Which process computes a row: `owner_processes(sharding, shape)` reads the sharding's global device map,
the lowest process index whose devices hold an index of axis 0 (a block or a row of a batch); every
process derives the same split from the same batch plan, without talking (`process_rows`).

`gather_rows(local_nd, owners_n)` assembles, in every process, a matrix [N, D] of which each process
computed some rows: process p sends its rows in input order, zero-padded to a power of two >= the largest
share M (few compiled shapes), in slices of at most `GATHER_ROWS` rows, through
`multihost_utils.process_allgather`, an exact copy: the gathered values are bit-identical to the computed
ones. Per call: P x min(2M, GATHER_ROWS) x D floats received.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

SUPERVISED_ENV = "PICCOLO_JAX_SUPERVISED"  # set in the process a multi-host supervisor starts
TEMP_TOKEN_ENV = "PICCOLO_JAX_TEMP_TOKEN"  # the supervisor's pid: names the child's temporary files
def add_distributed_arguments(parser, *, heartbeat: bool = False) -> None:
    """--coordinator / --num-processes / --process-id (and --heartbeat-timeout with `heartbeat`)."""
    parser.add_argument("--coordinator", default=None, help="multi-host: coordinator HOST:PORT")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    if heartbeat:
        parser.add_argument("--heartbeat-timeout", type=int, default=60, metavar="SECONDS",
                            help="multi-host: a process silent this long is dead and the others stop (default 60)")


def multi_process(args) -> bool:
    """Whether this start joins a multi-process run (explicitly, or detected from the cluster environment)."""
    if args.coordinator or (args.num_processes or 1) > 1:
        return True
    return (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in os.environ
            or "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ)


def init_distributed(args, heartbeat_timeout_s: int) -> None:
    """`jax.distributed.initialize` from the flags, else from the cluster environment; before any JAX work."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
    kwargs = {"heartbeat_timeout_seconds": heartbeat_timeout_s}
    if args.coordinator or args.num_processes:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)  # cluster auto-detection (SLURM, Cloud TPU, env vars)


def start(args) -> bool:
    """For the inference commands: join the run's processes when the flags or the cluster say so (heartbeat
    from --heartbeat-timeout); True when this is a multi-process run."""
    if not multi_process(args):
        return False
    init_distributed(args, args.heartbeat_timeout)
    return True


def finish(multi: bool, code: int) -> int:
    """End a command: one process returns `code`. Several processes leave together (`shutdown` waits for
    every process) after success; after a failure this process exits at once, without waiting for peers
    that may be inside a collective: they see it gone through the heartbeats and stop too."""
    if not multi:
        return code
    if code == 0:
        import jax

        jax.distributed.shutdown()
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def temp_path(path: Path) -> Path:
    """The temporary sibling an output is written to before its rename: `.NAME.tmp-TOKEN`, TOKEN the
    supervisor's process id in a supervised child (so the supervisor can remove it), else our own."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.environ.get(TEMP_TOKEN_ENV) or os.getpid()}")


def set_parent_death_signal() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child dies with its supervisor (kill -9 of the supervisor must not orphan it)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_child(command: str, argv: list[str]) -> int:
    """`python -m piccolo_jax COMMAND ARGV` as a supervised child (SIGINT / SIGTERM forwarded, the child
    dies with us); its return code, -N when signal N killed it.

    JAX ends a process whose distributed service failed (a peer died, most often the coordinator) with
    SIGABRT from C++, before Python can say or clean up anything; the supervisor outlives that."""
    env = dict(os.environ, **{SUPERVISED_ENV: "1", TEMP_TOKEN_ENV: str(os.getpid())})
    child = subprocess.Popen([sys.executable, "-m", "piccolo_jax", command, *argv], env=env,
                             start_new_session=True, preexec_fn=set_parent_death_signal)
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_command(prog: str, args, body: Callable[[], int], *, command: str, argv: list[str] | None,
                outputs: Sequence[Path] = ()) -> int:
    """`body()`'s exit code, inside a multi-process run when the flags or the cluster say so.

    Multi-process: the command runs again as a supervised child (`run_child`) that joins the run
    (`start`, `finish`); a child stopped by the distributed service (a peer is gone) or killed leaves no
    temporary `outputs` behind and ends in one line, exit 1 (128 + N for signal N). In the child, a failed
    collective is one line and exit 1, another unexpected error its traceback and exit 1, at once."""
    if multi_process(args) and os.environ.get(SUPERVISED_ENV) != "1":
        rc = run_child(command, list(sys.argv[1:] if argv is None else argv))
        if rc >= 0:
            return rc
        for path in outputs:
            temp_path(path).unlink(missing_ok=True)
        who = args.process_id if args.process_id is not None else os.environ.get("SLURM_PROCID", "?")
        name = signal.Signals(-rc).name
        why = ("the JAX distributed service stopped it: another process of the run is gone (the coordinator "
               "or a peer that stopped sending heartbeats)") if -rc == signal.SIGABRT else f"killed by {name}"
        sys.stderr.write(f"{prog}: error: process {who}: {why}; nothing was written; rerun the same command "
                         "on every process\n")
        return 1 if -rc == signal.SIGABRT else 128 - rc
    multi = start(args)
    try:
        code = body()
    except KeyboardInterrupt:
        if not multi:
            raise
        code = 130
    except Exception as e:
        if not multi:
            raise
        import jax

        if isinstance(e, jax.errors.JaxRuntimeError):
            message = " ".join(str(e).split())
            sys.stderr.write(f"{prog}: error: process {jax.process_index()}: lost contact with another process of "
                             f"the run ({message}); nothing was written; rerun the same command on every process\n")
        else:
            traceback.print_exc()
        code = 1
    return finish(multi, code)


def is_main_process() -> bool:
    """Process 0 writes the outputs and prints the results."""
    import jax

    return jax.process_index() == 0



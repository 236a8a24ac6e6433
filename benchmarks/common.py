"""Shared helpers of the benchmarks: interleaved timing, matmul peak, FLOP counts and table printing.

Every benchmark compares JAX and PyTorch in the same process. On a shared, noisy CPU the two sides are
timed *interleaved* (A, B, A, B, ...) so that load from elsewhere hits both alike, and medians are reported.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence


def peak_tflops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Dense matmul peak for a device kind in TFLOP/s (None when unknown, e.g. a CPU): the trainer's table."""
    from piccolo_jax.training.flops import peak_flops

    peak = peak_flops(device_kind, dtype)
    return None if peak is None else peak / 1e12


def timeit(fn: Callable[[], object], sync: Callable[[object], object] = lambda x: x) -> float:
    """Seconds for one call of `fn`, `sync(result)` included (e.g. jax.block_until_ready)."""
    t0 = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], float]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every timer `warmup` times, then `reps` rounds of (A, B, ...), rotating the order each round.

    Each value of `fns` returns the seconds of one measured call. Returns the list of times per name.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(fns[n]())
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """Relative spread (max - min) / median of a list of times, as a percentage string."""
    m = statistics.median(xs)
    return f"{100.0 * (max(xs) - min(xs)) / m:.0f}%" if m > 0 else "-"


def ratio_of_medians(a: Sequence[float], b: Sequence[float]) -> float:
    """median(b) / median(a): > 1 means the side timed by `a` is faster."""
    return statistics.median(b) / statistics.median(a)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of the per-round ratios b[i] / a[i] (robust to load that changes between rounds)."""
    return statistics.median([y / x for x, y in zip(a, b)])


# --------------------------------------------------------------------------------------- matmul peak
def matmul_peak_gflops(n: int = 4096, reps: int = 5) -> dict[str, float]:
    """Achieved float32 GFLOP/s of an n x n x n matmul: jnp.dot and torch.mm, timed interleaved.

    2 n^3 FLOPs per product (one multiply and one add per term). Median of `reps` rounds.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    fns = {"jax": lambda: timeit(lambda: dot(a, b), jax.block_until_ready)}
    try:
        import torch

        ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)

        def tmm():
            with torch.inference_mode():
                return timeit(lambda: torch.mm(ta, tb))
        fns["torch"] = tmm
    except ImportError:
        pass
    times = interleaved(fns, reps=reps, warmup=1)
    flops = 2.0 * n ** 3
    return {k: flops / median(v) / 1e9 for k, v in times.items()}


# ---------------------------------------------------------------------------------------- FLOP counts
def encoder_matmul_flops(hidden: int, layers: int, ffn: int, tokens_per_seq: int, seqs: int) -> float:
    """Matmul FLOPs of one BERT forward over `seqs` sequences (`piccolo_jax.training.flops.encoder_flops`,
    the trainer's MFU arithmetic). A training step (forward + backward) is 3x this."""
    from types import SimpleNamespace

    from piccolo_jax.training.flops import encoder_flops

    shape = SimpleNamespace(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn)
    return encoder_flops(shape, seqs, tokens_per_seq)


# ------------------------------------------------------------------------------------------- reporting
def environment_line() -> str:
    """One line naming the versions, processor and thread settings that a reader needs to compare runs."""
    import jax

    parts = [f"python {platform.python_version()}", f"jax {jax.__version__}",
             f"backend {jax.default_backend()} ({jax.devices()[0].device_kind} x{jax.device_count()})"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    parts.append(f"{os.cpu_count()} CPUs")
    try:
        parts.append(f"load {os.getloadavg()[0]:.1f}")
    except OSError:
        pass
    env = [f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "XLA_FLAGS",
                                            "OMP_NUM_THREADS") if os.environ.get(k)]
    return "; ".join(parts + env)


def load_warning() -> str | None:
    """A note when other processes keep the CPUs busy (PyTorch's OpenMP threads suffer more than XLA's)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cpus = os.cpu_count() or 1
    if load > 0.75 * cpus:
        return (f"note: 1-minute load {load:.1f} on {cpus} CPUs: other processes compete for the cores; "
                "medians are contended (the 'best' columns approximate a quiet machine)")
    return None


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
    """A plain, aligned text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print("  ".join(c.rjust(w) for c, w in zip(cells[0], widths)))
    print(line)
    for r in cells[1:]:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def _fmt(x: object) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.2f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"

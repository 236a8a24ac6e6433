"""Device memory of the train step, known before it runs: compiled peak, device limit, chunks that fit.

XLA plans every buffer of a compiled program ahead of time, so `compiled.memory_analysis()` gives the
per-device footprint of one step before anything is allocated:

    peak = arguments + outputs - aliased + temporaries

arguments are the train state (float32 params + AdamW moments) and the batch, outputs the new state and
the metrics, aliased the bytes that donation lets the outputs reuse (the state), temporaries the
activations, gradients and loss working set. With gradient caching only one chunk's activations are
alive at a time, so the temporaries shrink roughly as 1 / num_chunks until the fixed terms (state,
gradients, embeddings of the whole batch, loss blocks) dominate.

The trainer compiles the step at the largest padded shapes (every row at its max length), compares the
peak with the device limit (`memory_stats()["bytes_limit"]`: what XLA's allocator may use, 75 % of the
device by default or `XLA_PYTHON_CLIENT_MEM_FRACTION`) and refuses a config that cannot fit, naming the
smallest `loss.num_chunks` whose compiled peak does fit (`fit_num_chunks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from piccolo_jax.data.packing import PackingSpec
from piccolo_jax.parallel.sharding import batch_sharding, replicated
from piccolo_jax.training.program_cache import step_description, wrap_step

GiB = 1024 ** 3
HEADROOM = 0.95  # the peak may use this share of the limit (allocator fragmentation, cuDNN/cuBLAS workspaces)


class NotEnoughMemory(ValueError):
    """The compiled step does not fit on the device; the message names the config field to change."""


def memory_breakdown(compiled: Any) -> dict[str, int]:
    """{"arguments", "outputs", "aliased", "temporaries", "peak"} in bytes per device."""
    m = compiled.memory_analysis()
    if m is None:
        raise ValueError("this backend reports no memory analysis for compiled programs")
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes)}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def compiled_peak_bytes(compiled: Any) -> int:
    """Per-device peak of a compiled program: arguments + outputs - aliased + temporaries."""
    return memory_breakdown(compiled)["peak"]


def device_memory_limit(device: jax.Device | None = None) -> int | None:
    """Bytes XLA's allocator may use on `device` (default: the first device); None when not reported (CPU)."""
    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except (NotImplementedError, RuntimeError):
        return None
    if not stats or not stats.get("bytes_limit"):
        return None
    return int(stats["bytes_limit"])


def chunk_candidates(global_batch: int, shards: int, start: int, largest: int | None = None) -> list[int]:
    """num_chunks values after `start`, doubling (2 s, 4 s, ...), that split the batch evenly over shards.

    Gradient caching needs global_batch % (shards x num_chunks) == 0 (every chunk spread over every
    shard); 32_768 pairs on 8 devices allow 16, 32, ..., 4_096 chunks (the last: 1 pair per device).
    """
    out, c = [], start * 2
    largest = global_batch // shards if largest is None else largest
    while c <= largest:
        if global_batch % (shards * c) == 0:
            out.append(c)
        c *= 2
    return out


@dataclasses.dataclass(frozen=True)
class FitReport:
    """Outcome of `fit_num_chunks`; `limit` None means the backend reports no limit (not checked)."""

    num_chunks: int
    peak: int | None  # None: not compiled (no limit to check against)
    limit: int | None
    peaks: dict[int, int]  # every num_chunks compiled -> its peak

    def line(self) -> str:
        if self.limit is None:
            return f"memory: not checked (the {jax.default_backend()} backend reports no device memory limit)"
        return (f"memory: compiled train step peak {self.peak / GiB:.2f} GiB per device of {self.limit / GiB:.2f} "
                f"GiB allowed, loss.num_chunks={self.num_chunks}")


def fit_num_chunks(peak_for: Callable[[int], int], num_chunks: int, candidates: Sequence[int],
                   limit: int | None, headroom: float = HEADROOM, field: str = "loss.num_chunks") -> FitReport:
    """Check that `peak_for(num_chunks)` fits `headroom x limit`; else raise naming the smallest that fits.

    `peak_for(c)` compiles the step with c chunks and returns its peak (see `compiled_peak_bytes`);
    `candidates` are the larger values to try in order (see `chunk_candidates`); each costs one compile
    and the search stops at the first that fits. `limit` None (CPU) skips the check and compiles nothing.
    """
    if limit is None:
        return FitReport(num_chunks, None, None, {})
    peaks = {num_chunks: int(peak_for(num_chunks))}
    if peaks[num_chunks] <= headroom * limit:
        return FitReport(num_chunks, peaks[num_chunks], limit, peaks)
    budget = headroom * limit
    for c in candidates:
        peaks[c] = int(peak_for(c))
        if peaks[c] <= budget:
            raise NotEnoughMemory(
                f"{field}={num_chunks}: the compiled train step needs {peaks[num_chunks] / GiB:.2f} GiB per "
                f"device, more than {headroom:.0%} of the device limit {limit / GiB:.2f} GiB; set {field}={c} "
                f"(compiled peak {peaks[c] / GiB:.2f} GiB; the gradient is the same)")
    tried = ", ".join(f"{c}: {p / GiB:.2f} GiB" for c, p in peaks.items())
    raise NotEnoughMemory(
        f"{field}={num_chunks}: the compiled train step needs {peaks[num_chunks] / GiB:.2f} GiB per device, more "
        f"than {headroom:.0%} of the device limit {limit / GiB:.2f} GiB, and no num_chunks tried fits ({tried}); "
        "use more devices, bfloat16 compute, remat 'full' or shorter max lengths")


# ---------------------------------------------------------------------------------- the train step's peak
def abstract_batch(mesh: jax.sharding.Mesh, global_batch: int, query_len: int, passage_len: int,
                   num_negatives: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a global batch at the given padded lengths, rows split over the data devices."""
    from piccolo_jax.parallel.sharding import batch_sharding

    shapes = {"query": (global_batch, query_len), "passage": (global_batch, passage_len)}
    if num_negatives:
        shapes["negative"] = (global_batch, num_negatives, passage_len)
    return {f"{side}_{kind}": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, len(shape)))
            for side, shape in shapes.items() for kind in ("input_ids", "attention_mask")}


def abstract_train_state(model_cfg, optimizer, mesh, strategy: str) -> Any:
    """The train state as ShapeDtypeStructs carrying their shardings (nothing allocated)."""
    from piccolo_jax.training.state import create_train_state, state_shardings

    shapes = jax.eval_shape(lambda: create_train_state(model_cfg, optimizer, mesh, strategy, jax.random.key(0)))
    shardings = state_shardings(model_cfg, optimizer, mesh, strategy)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def compile_train_step(model_cfg, loss_cfg, optimizer, mesh, strategy: str, batch: dict,
                       lr_schedule=None, programs=None) -> Any:
    """`make_train_step(...)` lowered and compiled on abstract inputs (`abstract_batch`): nothing runs.

    With the trainer's own `lr_schedule`, batch entries and program cache (`program_cache.ProgramCache`)
    this is the program its loop runs at these shapes, so a persistent compilation cache serves the loop's
    compile of them.
    """
    from piccolo_jax.training.step import make_train_step

    step = make_train_step(model_cfg, loss_cfg, optimizer, mesh, strategy, lr_schedule)
    if lr_schedule is not None:
        step = wrap_step(step, programs, replicated(mesh), step_description(model_cfg, loss_cfg, strategy))
    state = abstract_train_state(model_cfg, optimizer, mesh, strategy)
    lr_values = None if lr_schedule is None else jnp.asarray(lr_schedule.values)  # as the loop passes them
    return step.lower(state, batch, jax.random.key(0), lr_values=lr_values).compile()


def train_step_peak_for(model_cfg, loss_cfg, optimizer, mesh, strategy: str, batch: dict,
                        lr_schedule=None, programs=None) -> Callable[[int], int]:
    """`peak_for(num_chunks)` for `fit_num_chunks`: compile the step with that many chunks, return its peak."""
    def peak_for(num_chunks: int) -> int:
        cfg = dataclasses.replace(loss_cfg, num_chunks=num_chunks)
        return compiled_peak_bytes(compile_train_step(model_cfg, cfg, optimizer, mesh, strategy, batch,
                                                      lr_schedule, programs))
    return peak_for


def abstract_packed_batch(mesh, spec: PackingSpec, global_batch: int, num_negatives: int = 0) -> dict:
    """ShapeDtypeStructs of a packed global batch (rows split over the data devices), for compiling the
    train step before any data exists (`compile_train_step`)."""
    blocks = spec.shards * spec.num_chunks
    shapes = {"packed_query_lengths": (global_batch,), "packed_document_lengths": (global_batch, 1 + num_negatives)}
    for side, rows, length in (("query", spec.query_rows, spec.query_length),
                               ("document", spec.document_rows, spec.document_length)):
        for name in ("input_ids", "positions", "segments"):
            shapes[f"packed_{side}_{name}"] = (blocks * rows, length)
    return {k: jax.ShapeDtypeStruct(s, np.int32, sharding=batch_sharding(mesh, len(s))) for k, s in shapes.items()}

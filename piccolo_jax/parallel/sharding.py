"""The device mesh and every sharding decision. This is the only module that names mesh axes.

Mesh axes:
    "data"    pure data parallelism: the batch is split, parameters are replicated (or ZeRO-1 sharded state)
    "fsdp"    data parallelism whose devices also split parameters and optimizer state (ZeRO-3 / FSDP)
    "tensor"  Megatron-style tensor parallelism inside attention heads and the FFN (piccolo-large)

The batch dimension is split over ("data", "fsdp"); every device of those two axes holds different rows.

Strategies (config `parallel.strategy`):
    "dp"     parameters and optimizer state replicated (except over "tensor")
    "zero1"  parameters replicated, optimizer state sharded over all data devices (piccolo's DeepSpeed setting)
    "fsdp"   parameters and optimizer state sharded over "fsdp" following the logical-axis rules
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from piccolo_jax.config.mesh import MeshConfig

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
BATCH_AXES = (DATA, FSDP)  # the global batch is split over both data-parallel axes

# Logical parameter axes (declared in model.py) -> mesh axes, per strategy. None = replicated.
# "layers" (the leading [L] axis of the stacked blocks, scanned over) is never sharded: every device runs
# every layer, so splitting it would move whole layers between devices at each scan step.
_TENSOR_RULES = {"heads": TENSOR, "mlp": TENSOR, "vocab": TENSOR, "layers": None}
LOGICAL_RULES: dict[str, dict[str, str | None]] = {
    "dp": dict(_TENSOR_RULES),
    "zero1": dict(_TENSOR_RULES),
    "fsdp": dict(_TENSOR_RULES, embed=FSDP),
}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (jit propagates shardings)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, found {n}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def adopt_mesh(mesh: Mesh, axis_names: Mapping[str, str] | None = None) -> Mesh:
    """A mesh a user brings, as ours: the same devices in the same layout, axes (data, fsdp, tensor), Auto.

    `axis_names` maps the mesh's own axis names to ours (e.g. {"batch": "data", "model": "tensor"}); an axis
    it leaves out must already be named data, fsdp or tensor. Axes the mesh lacks get size 1, so a
    (4, 2) ("batch", "model") mesh becomes (data=4, fsdp=1, tensor=2) over the same 8 devices: device
    [i, j] of the user's mesh is device [i, 0, j] of ours.

    The axis types are always Auto, whatever the user's (jax.make_mesh makes Explicit axes by default):
    every sharding here is an input / output sharding of jit or a with_sharding_constraint, and the model
    leaves the intermediate shardings to XLA's propagation. Under Explicit axes every sharded operation
    (the embedding gather over a vocabulary split on "tensor", the head einsums) would need its output
    sharding spelled out. A renamed, Auto-typed mesh over the same device array places every shard on the
    device the user's mesh would, so nothing moves.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh={mesh!r}: expected a jax.sharding.Mesh (e.g. from jax.make_mesh)")
    mapping = dict(axis_names or {})
    theirs = tuple(mesh.axis_names)
    if len(theirs) > len(MESH_AXES):
        raise ValueError(f"mesh axes {theirs}: piccolo-jax uses at most {len(MESH_AXES)} axes, "
                         f"{' / '.join(MESH_AXES)}; make a mesh of at most {len(MESH_AXES)} axes")
    for axis, ours in mapping.items():
        if axis not in theirs:
            raise ValueError(f"axis_names maps {axis!r}, which is not an axis of the mesh (axes {theirs})")
        if ours not in MESH_AXES:
            raise ValueError(f"axis_names[{axis!r}]={ours!r}: expected one of {' / '.join(MESH_AXES)}")
    names = [mapping.get(axis, axis) for axis in theirs]
    if not set(names) <= set(MESH_AXES):
        raise ValueError(_foreign_axes_message(theirs, names, mapping))
    for ours in MESH_AXES:
        if names.count(ours) > 1:
            raise ValueError(f"mesh axes {theirs} with axis_names={mapping}: "
                             f"{[a for a, n in zip(theirs, names) if n == ours]} all map to {ours!r}")
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if tuple(names) == MESH_AXES and tuple(mesh.axis_types) == auto:
        return mesh  # already ours
    missing = [a for a in MESH_AXES if a not in names]
    devices = mesh.devices.reshape(mesh.devices.shape + (1,) * len(missing))  # our missing axes, size 1
    order = [(names + missing).index(a) for a in MESH_AXES]  # their axis order -> (data, fsdp, tensor)
    return Mesh(devices.transpose(order), MESH_AXES, axis_types=auto)


def _foreign_axes_message(theirs: tuple[str, ...], names: list[str], mapping: dict[str, str]) -> str:
    """The one-line refusal of a mesh whose axes are not ours, with a mapping to copy as an example."""
    free = [a for a in (DATA, TENSOR, FSDP) if a not in names]
    example = dict(mapping)
    for axis, name in zip(theirs, names):
        if name not in MESH_AXES:
            example[axis] = free.pop(0) if free else DATA
    return (f"mesh axes {theirs}: piccolo-jax needs axes named {' / '.join(MESH_AXES)} (any subset, any order); "
            f"pass axis_names= to map yours, e.g. axis_names={example}")


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards: 32 GPUs x 1 = 32 for piccolo's data-parallel run."""
    return mesh.shape[DATA] * mesh.shape[FSDP]


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel devices, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _spec_from_logical(shape: tuple[int, ...], names: tuple[str | None, ...], rules: dict, mesh: Mesh) -> P:
    """Map logical names to mesh axes; a dimension not divisible by its mesh axis stays replicated."""
    out, taken = [], set()
    for dim, name in zip(shape, names):
        axis = rules.get(name) if name else None
        if axis is None or axis in taken or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
            out.append(None)
        else:
            out.append(axis)
            taken.add(axis)
    return P(*out)


def param_specs(abstract_params: Any, logical: Any, mesh: Mesh, strategy: str) -> Any:
    """PartitionSpec for every parameter from its logical axes and the strategy's rules."""
    rules = LOGICAL_RULES[strategy]
    return jax.tree.map(lambda a, names: _spec_from_logical(a.shape, names, rules, mesh), abstract_params, logical,
                        is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(abstract_params: Any, logical: Any, mesh: Mesh, strategy: str) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(abstract_params, logical, mesh, strategy))


def _zero1_spec(shape: tuple[int, ...], base: P, mesh: Mesh) -> P:
    """Additionally split the largest free dimension divisible by the data-parallel size (ZeRO-1)."""
    n = data_parallel_size(mesh)
    spec = list(base) + [None] * (len(shape) - len(base))
    free = [i for i, s in enumerate(spec) if s is None and shape[i] % n == 0]
    if n == 1 or not free:
        return P(*spec)
    best = max(free, key=lambda i: shape[i])
    spec[best] = BATCH_AXES
    return P(*spec)


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params: Any, logical: Any, mesh: Mesh,
                        strategy: str) -> Any:
    """Shardings of `optimizer.init(params)`: moment trees follow the params (ZeRO-1: split over data)."""
    specs = param_specs(abstract_params, logical, mesh, strategy)
    if strategy == "zero1":
        specs = jax.tree.map(lambda a, s: _zero1_spec(a.shape, s, mesh), abstract_params, specs)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    abstract_state = jax.eval_shape(optimizer.init, abstract_params)
    return optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_state, shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def host_local_to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble global arrays from each process's rows (multi-host: every process passes its own slice)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local_batch.items()}


def describe(mesh: Mesh, strategy: str) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return (f"mesh ({shape}) over {mesh.devices.size} {jax.devices()[0].platform} device(s) in "
            f"{jax.process_count()} process(es); strategy={strategy}; batch split {data_parallel_size(mesh)}-way")


def row_constraint(mesh: Mesh):
    """`constrain(x, row_axis)`: pin axis `row_axis` of x to the data-parallel devices, the rest replicated.

    Gradient caching uses it to keep every chunk spread over all devices.
    """
    def constrain(x: jax.Array, row_axis: int = 0) -> jax.Array:
        spec = [None] * x.ndim
        spec[row_axis] = BATCH_AXES
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
    return constrain


def shard_local_sum(mesh: Mesh, strategy: str):
    """`run(fn, replicated, rows)`: fn on each data shard's own rows, results summed with one psum.

    `rows` leaves are split over the data-parallel devices along axis 1 ([C, rows, ...] chunk stacks),
    `replicated` is passed whole to every shard. Gradient caching uses it so that the parameter gradient
    is all-reduced once per step instead of once per encoder call and chunk. Only for replicated
    parameters without tensor parallelism ("dp" / "zero1", tensor=1); otherwise None.
    """
    if strategy == "fsdp" or mesh.shape[TENSOR] != 1:
        return None

    def run(fn, replicated, rows):
        def local(rep, r):
            # Mark the replicated floats as per-shard values, so that differentiating fn against them
            # yields each shard's own partial gradient (no implicit psum per use); sum once here.
            rep = jax.tree.map(lambda x: jax.lax.pcast(x, BATCH_AXES, to="varying")
                               if jnp.issubdtype(x.dtype, jnp.floating) else x, rep)
            return jax.lax.psum(fn(rep, r), BATCH_AXES)

        in_specs = (jax.tree.map(lambda _: P(), replicated),
                    jax.tree.map(lambda _: P(None, BATCH_AXES), rows))
        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P())(replicated, rows)

    return run

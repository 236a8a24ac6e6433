"""MeshConfig: the device mesh's shape and the sharding strategy (plain types, no JAX).

The strategies and axes are explained in piccolo_jax.parallel.sharding, the only module that builds a mesh."""

from __future__ import annotations

import dataclasses

STRATEGIES = ("dp", "zero1", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. -1 on one axis means "all remaining devices"."""

    data: int = -1  # pure data-parallel devices
    fsdp: int = 1  # data-parallel devices that also shard parameters (strategy "fsdp")
    tensor: int = 1  # tensor-parallel devices (heads / FFN columns split)
    strategy: str = "zero1"  # "dp" | "zero1" | "fsdp" (see module docstring)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy={self.strategy!r}; expected one of {STRATEGIES}")
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes data={self.data} fsdp={self.fsdp} tensor={self.tensor}: "
                             "positive, with at most one -1")

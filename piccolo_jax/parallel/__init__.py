"""Devices and processes: the mesh and every sharding rule (`sharding`, the only module that names mesh
axes), multi-process start-up, supervision and cross-process row gathering (`processes`, `gather`), and
JAX runtime settings (`runtime`), and exact checksums of sharded arrays (`array_digest`).

May import: `piccolo_jax.config`.
"""

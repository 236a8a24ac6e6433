"""Data pipeline: record formats, TFDS storage, dataset-homogeneous sampling, tokenised batches."""

from piccolo_jax.data.config import DataConfig
from piccolo_jax.data.loader import Loader, make_loader, to_global_arrays
from piccolo_jax.data.records import BadRecord, Record

__all__ = ["BadRecord", "DataConfig", "Loader", "Record", "make_loader", "to_global_arrays"]

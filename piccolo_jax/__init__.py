"""piccolo-jax: train and run piccolo Chinese text-embedding models (BERT + mean pooling) on a device mesh.

    from piccolo_jax import Encoder
    enc = Encoder.load("path/to/model")          # Hugging Face directory, piccolo-jax model directory, run
                                                 # directory or hub id ORG/NAME (from the local HF cache)
    emb = enc.encode(["查询文本"], kind="query")  # float32 numpy [N, D], L2-normalised; the model's query
                                                 # prompt (else piccolo's "查询: ") before each text

Importing the package is cheap: `Encoder` (and with it JAX and Flax) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Encoder"]

if TYPE_CHECKING:  # pragma: no cover
    from piccolo_jax.inference.encoder import Encoder

_LAZY = {"Encoder": "piccolo_jax.inference.encoder"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'piccolo_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))

"""Evaluation: local C-MTEB-style tasks (`tasks`: retrieval, STS, reranking files), their metrics
(`metrics`: trec_eval-compatible retrieval, Spearman / Pearson, MAP / MRR), the runners that encode and
score (`runners`) and the adapter the `mteb` package runs (`mteb_model.MTEBModel`).

May import: `piccolo_jax.config`, `io`, `text`, `parallel`, `model`, `hf`, `inference`.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "MTEBModel":  # piccolo_jax.evaluation.MTEBModel, imported (with JAX) on first use
        from piccolo_jax.evaluation.mteb_model import MTEBModel

        return MTEBModel
    raise AttributeError(f"module 'piccolo_jax.evaluation' has no attribute {name!r}")

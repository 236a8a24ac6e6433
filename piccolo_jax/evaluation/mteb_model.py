"""Our encoder inside the `mteb` package (2.x): `MTEBModel` and running named mteb tasks.

`MTEBModel(encoder)` satisfies `mteb.EncoderProtocol`: it has `mteb_model_meta` (an `mteb.models.ModelMeta`
naming the model, its width, token limit, JAX and cosine similarity), `encode(DataLoader of batches,
*, task_metadata, hf_split, hf_subset, prompt_type)`, `similarity` and `similarity_pairwise`. mteb's
prompt types map onto the encoder's instructions (the model's prompts, else piccolo's):

    PromptType.query     -> kind "query"    (the query prefix + text, piccolo's "查询: ")
    PromptType.document  -> kind "passage"  (the passage prefix + text, "结果: "; mteb joins a title as "title text")
    None                 -> no prefix       (STS, classification, clustering, ...)

(`instructions=False` sends every text without a prefix.) The batches mteb passes ({"text": [...],
...}) are gathered and encoded in one `Encoder.encode` call, so our length bucketing sees the whole
set; mteb's `batch_size` encode keyword is ignored (the encoder plans batches by token budget).

    import mteb
    model = MTEBModel.load("runs/finetune")            # or MTEBModel(Encoder.load(path))
    mteb.evaluate(model, mteb.get_tasks(tasks=["T2Retrieval", "AFQMC"]))

`mteb` is optional: it is imported only when the model meta is asked for or tasks are run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class MTEBModel:
    """An `Encoder` (anything with `encode(texts, kind=...)` and `dim`) in mteb's encoder interface."""

    def __init__(self, encoder: Any, *, instructions: bool = True, name: str | None = None,
                 revision: str | None = None, batch_size: int | None = None, **encode_kwargs: Any):
        """name: "organisation/model" as mteb wants it (default "piccolo-jax/local-model").
        revision: mteb's revision of the model, which keys its result cache with the name. Default: a
            fingerprint of everything that determines the embeddings (`embedding_fingerprint`), so that new
            weights, another prefix or `instructions` never read an older run's cached scores."""
        self.encoder, self.instructions = encoder, instructions
        self.name = name or "piccolo-jax/local-model"
        if "/" not in self.name:
            self.name = f"piccolo-jax/{self.name}"
        self.revision = revision
        self.encode_kwargs = dict(encode_kwargs)
        if batch_size is not None:
            self.encode_kwargs["batch_size"] = batch_size
        self._meta = None

    @classmethod
    def load(cls, path: str | os.PathLike, *, instructions: bool = True, **load_kwargs: Any) -> MTEBModel:
        """`Encoder.load(path, **load_kwargs)` wrapped, named "piccolo-jax/<directory name>"."""
        from piccolo_jax.inference.encoder import Encoder

        path = Path(path)
        return cls(Encoder.load(path, **load_kwargs), instructions=instructions,
                   name=f"piccolo-jax/{path.resolve().name}")

    @property
    def mteb_model_meta(self):
        """mteb's `ModelMeta` of this model (built once; needs the `mteb` package)."""
        if self._meta is None:
            from mteb.models import ModelMeta

            cfg = getattr(self.encoder, "cfg", None)
            self._meta = ModelMeta.create_empty(overwrites={
                "name": self.name,
                "revision": self.revision or embedding_fingerprint(self.encoder, self.instructions,
                                                                   self.encode_kwargs),
                "embed_dim": getattr(self.encoder, "dim", None),
                "max_tokens": getattr(self.encoder, "max_length", None),
                "framework": ["JAX"],
                "similarity_fn_name": _cosine(),
                "use_instructions": self.instructions,
                "open_weights": True,
                "reference": None,
                "n_parameters": None if cfg is None else _count_parameters(self.encoder),
            })
        return self._meta

    def encode(self, inputs: Any, *, task_metadata: Any = None, hf_split: str | None = None,
               hf_subset: str | None = None, prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        """Embeddings float32 [N, D], rows in input order, of an iterable of {"text": [...]} batches
        (mteb 2's DataLoader) or of a list of strings."""
        kind = _kind_of(prompt_type) if self.instructions else None
        return np.asarray(self.encoder.encode(_texts_of(inputs), kind=kind, **self.encode_kwargs),
                          dtype=np.float32)

    @staticmethod
    def similarity(a: Any, b: Any) -> np.ndarray:
        """Cosine similarity matrix [N, M] (float32, as sentence-transformers' cos_sim); of two single
        vectors [D] and [D], their cosine as a 0-d array (mteb's summarization scorer takes `float()` of it)."""
        sims = _unit(np.atleast_2d(a)) @ _unit(np.atleast_2d(b)).T
        return sims[0, 0] if np.ndim(a) == 1 and np.ndim(b) == 1 else sims

    @staticmethod
    def similarity_pairwise(a: Any, b: Any) -> np.ndarray:
        """Cosine similarity of row i of `a` with row i of `b`: [N]."""
        return np.sum(_unit(np.atleast_2d(a)) * _unit(np.atleast_2d(b)), axis=-1)


def embedding_fingerprint(encoder: Any, instructions: bool, encode_kwargs: dict) -> str:
    """"jax-" + 16 hex digits of what determines the embeddings of `MTEBModel.encode`: the weights (their
    device-side checksums, `parallel.array_digest`: any sharding, no copy to the host), the model config,
    the tokenizer (its full serialisation), the token limit, the prefixes and whether they are used, and
    the encode keywords (dim, normalize, ...). "local" for an encoder without parameters (duck-typed)."""
    import hashlib
    import json

    params = getattr(encoder, "params", None)
    if params is None:
        return "local"
    from piccolo_jax.parallel.array_digest import tree_digest

    tokenizer = getattr(encoder, "tokenizer", None)
    backend = getattr(tokenizer, "backend", None)
    parts = {
        "weights": tree_digest(params),
        "config": repr(getattr(encoder, "cfg", None)),
        "tokenizer": backend.to_str() if hasattr(backend, "to_str") else repr(tokenizer),
        "max_length": getattr(encoder, "max_length", None),
        "prefixes": [getattr(encoder, "query_prefix", None), getattr(encoder, "passage_prefix", None)],
        "instructions": instructions,
        "encode": {k: repr(v) for k, v in sorted(encode_kwargs.items())},
    }
    return "jax-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _cosine() -> Any:
    """mteb's ScoringFunction.COSINE (a plain string makes its pydantic serializer warn)."""
    try:
        from mteb.models.model_meta import ScoringFunction
    except ImportError:  # an mteb without the enum takes the string
        return "cosine"
    return ScoringFunction.COSINE


def _count_parameters(encoder: Any) -> int | None:
    import jax

    params = getattr(encoder, "params", None)
    return None if params is None else int(sum(np.size(x) for x in jax.tree.leaves(params)))


def _unit(x: Any) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _kind_of(prompt_type: Any) -> str | None:
    value = getattr(prompt_type, "value", prompt_type)
    if value is None:
        return None
    if value == "query":
        return "query"
    if value in ("document", "passage"):
        return "passage"
    raise ValueError(f"prompt_type={prompt_type!r}; expected query, document or None")


def _texts_of(inputs: Any) -> list[str]:
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and all(isinstance(t, str) for t in inputs):
        return list(inputs)
    texts: list[str] = []
    for i, batch in enumerate(inputs):  # mteb 2: a DataLoader of {"text": [...], ...} batches
        if not isinstance(batch, dict) or "text" not in batch:
            raise TypeError(f"inputs: item {i} is a {type(batch).__name__}; expected str or a batch dict "
                            "with a 'text' list")
        batch_texts = batch["text"]
        batch_texts = [batch_texts] if isinstance(batch_texts, str) else list(batch_texts)
        for j, t in enumerate(batch_texts):
            if not isinstance(t, str):
                raise TypeError(f"inputs: batch {i} text[{j}] is a {type(t).__name__}, expected str")
        texts.extend(batch_texts)
    return texts


# ------------------------------------------------------------------------------------- named mteb tasks
class MTEBTasksUnavailable(Exception):
    """A named task is unknown to mteb, or its data cannot be loaded (offline, not in the cache)."""


def load_mteb_tasks(names: Sequence[str]) -> list:
    """mteb tasks by name with their data loaded now (from the Hugging Face datasets cache when offline).

    Raises MTEBTasksUnavailable naming the task and the reason in one line.
    """
    try:
        import mteb
    except ImportError:
        raise MTEBTasksUnavailable("the mteb package is not installed (pip install mteb)") from None
    tasks = []
    for name in names:
        try:
            task = mteb.get_task(name)
        except Exception as e:  # noqa: BLE001  (mteb raises KeyError / ValueError with suggestions)
            raise MTEBTasksUnavailable(f"mteb task {name!r}: {_one_line(e)}") from None
        try:
            task.load_data()
        except Exception as e:  # noqa: BLE001  (datasets: offline, missing from the cache, network ...)
            raise MTEBTasksUnavailable(f"mteb task {name!r}: its data cannot be loaded ({type(e).__name__}: "
                                       f"{_one_line(e)}); download it once with network access into the "
                                       "Hugging Face cache (HF_HOME), then run offline") from None
        tasks.append(task)
    return tasks


def run_mteb_tasks(model: MTEBModel, tasks: Sequence, *, show_progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run loaded mteb tasks: {task name: {"type", "main_score", "scores": {split: [per-subset dict]}}}.

    mteb's result cache is not used: results are keyed by model name, and a retrained model keeps its
    directory name, so a cached score could belong to older weights.
    """
    import mteb

    result = mteb.evaluate(model, list(tasks), cache=None, show_progress_bar=show_progress)
    by_name = {t.metadata.name: t for t in tasks}
    return {tr.task_name: {"type": by_name[tr.task_name].metadata.type,
                           "main_score": by_name[tr.task_name].metadata.main_score, "scores": tr.scores}
            for tr in result.task_results}


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # KeyError's str() adds quotes
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."

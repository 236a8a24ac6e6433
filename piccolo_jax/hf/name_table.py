"""Declarative map between Hugging Face `BertModel` tensor names and our parameter tree.

Each row: (HF name pattern, our path pattern, hook). `{i}` stands for the layer index. Hooks are tiny
shape-asserting transforms: torch `nn.Linear` stores weight as [out, in], we store kernel as [in, out].
Everything that is not in the table is an error naming the tensor, except the explicit `IGNORED` buffers
and heads, which are reported.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from piccolo_jax.model_config import ModelConfig

Hook = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D linear weight, got shape {x.shape}")
    return np.ascontiguousarray(x.T)


# (HF name, our path, hook to ours). The inverse of `transpose` is `transpose`, of `identity` identity.
EMBEDDINGS = [
    ("embeddings.word_embeddings.weight", "embeddings/word/embedding", identity),
    ("embeddings.position_embeddings.weight", "embeddings/position/embedding", identity),
    ("embeddings.token_type_embeddings.weight", "embeddings/token_type/embedding", identity),
    ("embeddings.LayerNorm.weight", "embeddings/norm/scale", identity),
    ("embeddings.LayerNorm.bias", "embeddings/norm/bias", identity),
]
LAYER = [
    ("encoder.layer.{i}.attention.self.query.weight", "layers/{i}/attention/query/kernel", transpose),
    ("encoder.layer.{i}.attention.self.query.bias", "layers/{i}/attention/query/bias", identity),
    ("encoder.layer.{i}.attention.self.key.weight", "layers/{i}/attention/key/kernel", transpose),
    ("encoder.layer.{i}.attention.self.key.bias", "layers/{i}/attention/key/bias", identity),
    ("encoder.layer.{i}.attention.self.value.weight", "layers/{i}/attention/value/kernel", transpose),
    ("encoder.layer.{i}.attention.self.value.bias", "layers/{i}/attention/value/bias", identity),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers/{i}/attention/output/kernel", transpose),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers/{i}/attention/output/bias", identity),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers/{i}/attention_norm/scale", identity),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers/{i}/attention_norm/bias", identity),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers/{i}/ffn_in/kernel", transpose),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers/{i}/ffn_in/bias", identity),
    ("encoder.layer.{i}.output.dense.weight", "layers/{i}/ffn_out/kernel", transpose),
    ("encoder.layer.{i}.output.dense.bias", "layers/{i}/ffn_out/bias", identity),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers/{i}/ffn_norm/scale", identity),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers/{i}/ffn_norm/bias", identity),
]
POOLER = [
    ("pooler.dense.weight", "pooler/kernel", transpose),
    ("pooler.dense.bias", "pooler/bias", identity),
]

# Present in some checkpoints, not part of the encoder: verified or reported, never silently dropped.
IGNORED_BUFFERS = ("embeddings.position_ids",)  # arange(max_positions) buffer of older transformers
IGNORED_HEAD_PREFIXES = ("cls.",)  # BertForPreTraining's MLM / NSP heads (e.g. bert-base-chinese)


def table(cfg: ModelConfig) -> list[tuple[str, str, Hook]]:
    """Every (HF name, our path, hook) for this config, layers expanded."""
    rows = list(EMBEDDINGS)
    for i in range(cfg.num_hidden_layers):
        rows += [(hf.format(i=i), ours.format(i=i), hook) for hf, ours, hook in LAYER]
    if cfg.add_pooler:
        rows += POOLER
    return rows


_OLD_LN = re.compile(r"LayerNorm\.(gamma|beta)$")


def canonical_hf_name(name: str) -> str:
    """Strip a `bert.` prefix and rename TF-era `gamma`/`beta` to `weight`/`bias`."""
    if name.startswith("bert."):
        name = name[len("bert."):]
    return _OLD_LN.sub(lambda m: "LayerNorm." + ("weight" if m.group(1) == "gamma" else "bias"), name)


def has_pooler(hf_names) -> bool:
    return any(canonical_hf_name(n).startswith("pooler.") for n in hf_names)

"""Declarative map between Hugging Face `BertModel` tensor names and our parameter tree.

Each row: (HF name pattern, our path, hook). `{i}` stands for the layer index: HF keeps one tensor per
layer (`encoder.layer.3.output.dense.weight` [D, F]), we keep the L layers stacked on a leading axis
(`layers/ffn_out/kernel` [L, F, D]), so layer i of a `LAYER` row is row i of our array. Hooks are tiny
shape-asserting transforms: torch `nn.Linear` stores weight as [out, in], we store kernel as [in, out].
Everything that is not in the table is an error naming the tensor, except the explicit `IGNORED` buffers
and heads, which are reported.

The Dense head (`dense_out_features` > 0) lives outside the BERT weights, in the sentence-transformers
module folder `2_Dense/` (its `model.safetensors` or `pytorch_model.bin`): `DENSE` maps that file's
`linear.weight` [E, D] / `linear.bias` [E] onto our `dense/kernel` [D, E] / `dense/bias`.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

import numpy as np

from piccolo_jax.config.model import ModelConfig

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
    ("encoder.layer.{i}.attention.self.query.weight", "layers/attention/query/kernel", transpose),
    ("encoder.layer.{i}.attention.self.query.bias", "layers/attention/query/bias", identity),
    ("encoder.layer.{i}.attention.self.key.weight", "layers/attention/key/kernel", transpose),
    ("encoder.layer.{i}.attention.self.key.bias", "layers/attention/key/bias", identity),
    ("encoder.layer.{i}.attention.self.value.weight", "layers/attention/value/kernel", transpose),
    ("encoder.layer.{i}.attention.self.value.bias", "layers/attention/value/bias", identity),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers/attention/output/kernel", transpose),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers/attention/output/bias", identity),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers/attention_norm/scale", identity),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers/attention_norm/bias", identity),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers/ffn_in/kernel", transpose),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers/ffn_in/bias", identity),
    ("encoder.layer.{i}.output.dense.weight", "layers/ffn_out/kernel", transpose),
    ("encoder.layer.{i}.output.dense.bias", "layers/ffn_out/bias", identity),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers/ffn_norm/scale", identity),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers/ffn_norm/bias", identity),
]
POOLER = [
    ("pooler.dense.weight", "pooler/kernel", transpose),
    ("pooler.dense.bias", "pooler/bias", identity),
]

# The sentence-transformers Dense module's state dict (`2_Dense/`), not part of the BertModel file.
DENSE = [
    ("linear.weight", "dense/kernel", transpose),
    ("linear.bias", "dense/bias", identity),
]

# Present in some checkpoints, not part of the encoder: verified or reported, never silently dropped.
IGNORED_BUFFERS = ("embeddings.position_ids",)  # arange(max_positions) buffer of older transformers
IGNORED_HEAD_PREFIXES = ("cls.",)  # BertForPreTraining's MLM / NSP heads (e.g. bert-base-chinese)


class Row(NamedTuple):
    hf: str  # HF tensor name
    ours: str  # path in our parameter tree
    layer: int | None  # index on our leading "layers" axis (None: not a per-layer tensor)
    hook: Hook


def dense_table(cfg: ModelConfig) -> list[Row]:
    """The tensors of the `2_Dense` module file (empty without a Dense head)."""
    return [Row(hf, ours, None, hook) for hf, ours, hook in DENSE] if cfg.dense_out_features else []


def table(cfg: ModelConfig) -> list[Row]:
    """Every tensor of the BertModel file of this config with where it goes, layers expanded (L x 16 layer
    rows); the Dense head's are `dense_table`."""
    rows = [Row(hf, ours, None, hook) for hf, ours, hook in EMBEDDINGS]
    for i in range(cfg.num_hidden_layers):
        rows += [Row(hf.format(i=i), ours, i, hook) for hf, ours, hook in LAYER]
    if cfg.add_pooler:
        rows += [Row(hf, ours, None, hook) for hf, ours, hook in POOLER]
    return rows


_LAYER_INDEX = re.compile(r"^encoder\.layer\.(\d+)\.")


def layer_indices(canonical_names) -> set[int]:
    """The i of every `encoder.layer.{i}.` tensor name (canonical names, see `canonical_hf_name`)."""
    return {int(m.group(1)) for m in map(_LAYER_INDEX.match, canonical_names) if m}


_OLD_LN = re.compile(r"LayerNorm\.(gamma|beta)$")


def canonical_hf_name(name: str) -> str:
    """Strip a `bert.` prefix and rename TF-era `gamma`/`beta` to `weight`/`bias`."""
    if name.startswith("bert."):
        name = name[len("bert."):]
    return _OLD_LN.sub(lambda m: "LayerNorm." + ("weight" if m.group(1) == "gamma" else "bias"), name)


def has_pooler(hf_names) -> bool:
    return any(canonical_hf_name(n).startswith("pooler.") for n in hf_names)

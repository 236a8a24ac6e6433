"""Encoder hyper-parameters: a frozen dataclass, read from / written to a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any

POOLINGS = ("mean", "cls", "none")
DTYPES = ("float32", "bfloat16")
# Rematerialisation of the scanned blocks in the backward pass (see piccolo_jax.model.bert).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION = ("auto", "cudnn", "explicit")  # see piccolo_jax.model.attention
# Sizes and ids: integers (an int or a numpy integer), never a float such as 1e7 or a bool.
INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size", "pad_token_id", "dense_out_features")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """BERT encoder shape and behaviour. Field names follow transformers' BertConfig where one exists."""

    vocab_size: int = 21128  # bert-base-chinese WordPiece vocabulary
    hidden_size: int = 768  # model width D
    num_hidden_layers: int = 12  # transformer blocks L
    num_attention_heads: int = 12  # heads N; head_dim = D / N
    intermediate_size: int = 3072  # FFN width F (4 x D)
    max_position_embeddings: int = 512  # learned absolute positions
    type_vocab_size: int = 2  # segment embeddings
    layer_norm_eps: float = 1e-12  # BERT's LayerNorm epsilon
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and on each residual branch
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    initializer_range: float = 0.02  # std of the truncated-normal-free normal init (as BERT)
    pad_token_id: int = 0  # padding id of the tokenizer
    add_pooler: bool = True  # keep BERT's [CLS] dense+tanh pooler so checkpoints round-trip
    pooling: str = "mean"  # sentence embedding: "mean" over non-padding tokens (piccolo), "cls", or "none"
    normalize: bool = True  # L2-normalise the sentence embedding
    # Dense(hidden_size -> dense_out_features), bias, identity activation, after pooling and before the
    # normalisation (piccolo v2's "scaling layer", 1,024 -> 1,792; sentence-transformers' 2_Dense); 0 = none.
    dense_out_features: int = 0
    compute_dtype: str = "float32"  # compute dtype; parameters stay float32; pooling/logits always float32
    # Backward-pass recomputation of each block: "none", "full" (keep only each block's input; least
    # memory), "dots_saveable", "dots_with_no_batch_dims_saveable". true / false read as "full" / "none".
    remat: str | bool = "none"
    attention: str = "auto"  # "auto" (cuDNN fused where it can run, else explicit), "cudnn" or "explicit"

    def __post_init__(self):
        for name in INT_FIELDS:  # before any arithmetic: 1e7 in a config.json is a float
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name}={value!r} must be an integer, got {type(value).__name__}")
        if self.num_attention_heads <= 0:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be positive")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}; expected one of {POOLINGS}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; expected one of {DTYPES}")
        if isinstance(self.remat, bool):  # the former boolean field: true = rematerialise every block
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES} (or true / false)")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r}; expected one of {ATTENTION}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if isinstance(self.dense_out_features, bool) or self.dense_out_features < 0:
            raise ValueError(f"dense_out_features={self.dense_out_features} must be >= 0 (0 = no Dense head)")
        if self.dense_out_features and self.pooling == "none":
            raise ValueError("dense_out_features needs a sentence embedding: pooling 'mean' or 'cls', not 'none'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_dim(self) -> int:
        """Width of the sentence embedding: dense_out_features with a Dense head, else hidden_size."""
        return self.dense_out_features or self.hidden_size

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from a transformers BertConfig dict; refuses architectures this encoder does not implement."""
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"config.json: hidden_act={act!r}; only exact 'gelu' (erf) is supported")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"config.json: position_embedding_type={pos!r}; only 'absolute' is supported")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError("config.json: decoder / cross-attention BERT is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: hf[k] for k in fields if k in hf}
        if "pad_token_id" in kwargs and kwargs["pad_token_id"] is None:
            kwargs.pop("pad_token_id")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in hf]
        if missing:
            raise ValueError(f"config.json: missing required fields {missing}")
        stored, asked = kwargs.get("dense_out_features", 0), overrides.get("dense_out_features")
        if stored and asked is not None and asked != stored:  # a trained head of another size cannot be read
            raise ValueError(f"config.json has a Dense head {kwargs.get('hidden_size')} -> {stored} "
                             f"(dense_out_features={stored}), but dense_out_features={asked} was asked for; set "
                             f"model.dense_out_features={stored}")
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        try:
            return cls.from_hf_dict(hf, **overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers BertConfig fields (plus our pooling fields, which transformers ignores)."""
        d = dataclasses.asdict(self)
        for runtime_only in ("remat", "compute_dtype", "attention"):
            d.pop(runtime_only)
        d.update(
            model_type="bert",
            architectures=["BertModel"],
            hidden_act="gelu",
            position_embedding_type="absolute",
            dtype="float32",
        )
        return d


# piccolo-base-zh: 768 / 12 layers / 12 heads / 3072, ~102 M parameters.
PICCOLO_BASE_ZH = ModelConfig()
# piccolo-large-zh: 1024 / 24 layers / 16 heads / 4096.
PICCOLO_LARGE_ZH = ModelConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                               intermediate_size=4096)

"""MFU arithmetic (`training.flops`) against hand counts for BERT-base."""

from __future__ import annotations

import numpy as np
import pytest

from piccolo_jax.config import ModelConfig
from piccolo_jax.training.flops import encoder_flops, peak_flops, step_flops

BASE = ModelConfig()  # bert-base-chinese: D 768, 12 layers, F 3072


def test_bert_base_forward_flops_per_token_by_hand():
    assert (BASE.hidden_size, BASE.num_hidden_layers, BASE.intermediate_size) == (768, 12, 3072)
    # per layer and token: Q, K, V, output 4 x 768^2 = 2,359,296 MACs; FFN 2 x 768 x 3,072 = 4,718,592 MACs;
    # 12 layers -> 84,934,656 MACs = 169,869,312 FLOPs; attention at T = 128: scores + weighted sum
    # 2 x 128 x 768 MACs x 12 layers = 2,359,296 MACs = 4,718,592 FLOPs; total 174,587,904 per token
    assert encoder_flops(BASE, rows=1, length=128) == 128 * 174_587_904
    assert encoder_flops(BASE, rows=3, length=128) == 3 * 128 * 174_587_904


def test_step_flops_padded_and_packed():
    per_seq = 128 * 174_587_904
    padded = {"query_attention_mask": np.ones((4, 128), np.int32), "passage_attention_mask": np.ones((4, 128)),
              "negative_attention_mask": np.ones((4, 2, 128)), "query_input_ids": np.ones((4, 128))}
    # 4 queries + 4 passages + 8 negatives = 16 sequences; x3 (forward + backward), x4 with chunks; 2 hosts
    assert step_flops(BASE, padded, process_count=1, num_chunks=1) == 16 * per_seq * 3
    assert step_flops(BASE, padded, process_count=2, num_chunks=4) == 16 * per_seq * 4 * 2
    packed = {"packed_query_input_ids": np.ones((3, 128)), "packed_document_input_ids": np.ones((5, 128)),
              "packed_query_lengths": np.ones(4), "query_attention_mask": np.ones((99, 128))}
    assert step_flops(BASE, packed, process_count=1, num_chunks=2) == 8 * per_seq * 4  # rows computed


@pytest.mark.parametrize("kind,bf16", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, bf16):
    assert peak_flops(kind) == bf16

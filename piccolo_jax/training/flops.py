"""FLOP arithmetic for MFU: the encoder's matmul FLOPs per step, and the peak matmul throughput of the
accelerators we run on, matched on `jax.Device.device_kind`.

Figures are dense (no sparsity) tensor-core / MXU TFLOP/s per chip from the vendors' data sheets, as
(bfloat16, float32). NVIDIA's float32 figure is the non-tensor-core rate (float32 matmuls run at
"highest" precision here, not TF32); a TPU runs float32 matmuls through its bf16 MXU passes, so its
float32 entry is the bf16 rate divided by the 3 passes of "high"/6 of "highest" precision — we list
bf16 / 6 ("highest", which the trainer's parity settings use).

Patterns are regular expressions searched in device_kind, most specific first, so that "H100 PCIe"
(756) and "H100 NVL" (835) do not read as the SXM part (989), and a TPU v5p (device_kind "TPU v5")
is not a v5e ("TPU v5 lite").
"""

from __future__ import annotations

import math
import re

# (pattern, bf16 TFLOP/s, fp32 TFLOP/s)
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    (r"H100.*PCIe", 756.0, 51.0),
    (r"H100.*NVL", 835.0, 60.0),
    (r"H100", 989.0, 67.0),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"H200", 989.0, 67.0),
    (r"GH200", 989.0, 67.0),
    (r"A100", 312.0, 19.5),  # SXM4 / PCIe, 40 and 80 GB
    (r"L40S", 362.0, 91.6),
    (r"\bL4\b", 121.0, 30.3),
    (r"A10G?\b", 125.0, 31.2),
    (r"V100", 125.0, 15.7),
    (r"TPU v4", 275.0, 275.0 / 6),
    (r"TPU v5 ?lite|TPU v5e", 197.0, 197.0 / 6),
    (r"TPU v5p|TPU v5$", 459.0, 459.0 / 6),  # the v5p reports "TPU v5"
    (r"TPU v6 ?lite|TPU v6e|TPU v6", 918.0, 918.0 / 6),  # Trillium
)


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Dense matmul FLOP/s of one chip for a device kind; None when unknown (a CPU, a new part)."""
    for pattern, bf16, fp32 in PEAK_TFLOPS:
        if re.search(pattern, device_kind.strip(), flags=re.IGNORECASE):
            return (bf16 if dtype == "bfloat16" else fp32) * 1e12
    return None


def peak_flops_per_device() -> float | None:
    """bf16 matmul peak of this run's devices (None on CPU or an unknown part)."""
    import jax

    return peak_flops(jax.devices()[0].device_kind)


def encoder_flops(cfg, rows: int, length: int) -> float:
    """Forward matmul FLOPs of the encoder on `rows` sequences of `length` tokens.

    Per token: 2 P_layers (P_layers = L (4 D^2 + 2 D F): Q, K, V, output and the two FFN matmuls) + 4 L T D
    (scores Q K^T and the weighted sum over T keys). BERT-base at T = 128: 2 x 84,934,656 + 4,718,592 =
    174,587,904 per token. Embedding lookups, layer norms and softmax are not matmuls and not counted.
    """
    d, f, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    p_layers = n_layers * (4 * d * d + 2 * d * f)
    return float(rows) * length * (2 * p_layers + 4 * n_layers * length * d)


def step_flops(cfg, host_batch: dict, process_count: int, num_chunks: int) -> float:
    """Matmul FLOPs of one train step (all hosts) on the shapes the step computes: packed rows
    (`packed_*_input_ids` [rows, L]) or padded sequences (`*_attention_mask` [..., T]).

    Backward is twice the forward; gradient caching adds one more forward: x3, or x4 with chunks.
    """
    packed = "packed_query_input_ids" in host_batch
    total = 0.0
    for key, value in host_batch.items():
        if key.endswith("input_ids" if packed else "attention_mask") and (key.startswith("packed_") or not packed):
            *lead, length = value.shape
            total += encoder_flops(cfg, math.prod(lead), length)
    return total * (3 if num_chunks == 1 else 4) * process_count

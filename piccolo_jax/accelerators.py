"""Peak matmul throughput of the accelerators we run on, matched on `jax.Device.device_kind` exactly.

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

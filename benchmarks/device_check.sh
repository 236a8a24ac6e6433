#!/usr/bin/env bash
# The accelerator check of the packing work, in one run (under 8 minutes on one H100 / H200):
#   benchmarks/device_check.sh             # on the GPU
#   benchmarks/device_check.sh --dry-run   # toy sizes on the CPU: shows the script runs
# Sections: bf16 vs float32 parity, fused (cuDNN) vs XLA attention padded and packed, BERT-base train-step
# throughput and MFU at length 128 (4,096 pairs, 4 gradient-caching chunks; packed and padded), encode
# throughput (see benchmarks/device_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-.90}"
if [[ " $* " == *" --dry-run "* ]]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
fi
exec timeout "${DEVICE_CHECK_TIMEOUT:-480}" python benchmarks/device_check.py "$@"

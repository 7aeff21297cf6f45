#!/usr/bin/env bash
# The prepared GPU check: run it whenever a GPU machine is available (a few minutes), paste its table into
# the README. It installs compactlm on that machine if needed, then runs benchmarks/gpu_check.py, which checks
# bf16 autocast, NCCL across the visible GPUs, FSDP2 (student sharded, teacher sharded and CPU-offloaded) and
# prints KD tokens/s and peak GPU memory for each setting.
#   bash scripts/gpu_check.sh            # all visible GPUs
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import compactlm" 2>/dev/null || python3 -m pip install --quiet -e . --no-deps
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
exec python3 benchmarks/gpu_check.py "$@"

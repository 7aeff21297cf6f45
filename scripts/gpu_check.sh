#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): score, prune and distill of the built-in model in bf16 under
# torchrun on every visible GPU, the teacher sharded and offloaded, a kill and a resume, export; one summary table
# (tokens/s, peak GPU memory, losses). Run it on a GPU machine after scripts/setup.sh (a few minutes):
#   bash scripts/gpu_check.sh            # all visible GPUs
#   bash scripts/gpu_check.sh --cpu      # the same path at tiny size on 2 CPU processes (gloo): CI runs this
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import compactlm" 2>/dev/null || python3 -m pip install --quiet -e . --no-deps
if [[ " $* " != *" --cpu "* ]]; then
  python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device (bash scripts/gpu_check.sh --cpu runs the tiny CPU rehearsal)'"
fi
exec python3 benchmarks/gpu_check.py "$@"

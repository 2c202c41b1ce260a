#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment in .venv with longctx and its test tools, and the
# default model (Qwen2.5-Coder-0.5B-Instruct GGUF) assembled and verified in ~/.cache/longctx.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# CPU machines: torch 2.13.0 (this workplace keeps its CPU wheel on disk); triton for the kernels'
# interpreter tests. On a GPU machine install your CUDA torch first; an installed torch >= 2.11 is kept.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/python -c "import triton" 2>/dev/null || .venv/bin/pip install -q "triton==3.7.1"
.venv/bin/pip install -q -e ".[test]"
.venv/bin/longctx fetch-model >/dev/null
echo "longctx is set up: .venv/bin/longctx --help" >&2

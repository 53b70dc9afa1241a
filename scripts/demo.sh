#!/usr/bin/env bash
# The main job on the bundled default model (SmolLM2-135M-Instruct): set up, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
alignkit chat default --prompt "${1:-Give me three tips for writing clear commit messages.}" --max-new-tokens 200

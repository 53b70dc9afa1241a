#!/usr/bin/env bash
# The main job on the bundled default model (SmolLM2-135M-Instruct): set up, then run the
# CPU demo workflow (LoRA SFT -> merge -> APO -> merge -> offline benchmarks -> model card),
# about 8 minutes on 2 CPU cores. Re-running skips the finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
alignkit run recipes/smollm2-cpu-demo.yaml "$@"

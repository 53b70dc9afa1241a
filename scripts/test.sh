#!/usr/bin/env bash
# Set up, then run the whole test suite (slow tests on the real bundled model included).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
ALIGNKIT_EXTRAS=all,dev bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks
ruff format --check src tests benchmarks
python -m pytest tests "$@"

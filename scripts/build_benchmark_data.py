"""Rebuild the shipped offline benchmark data from the public copies.

    python scripts/build_benchmark_data.py [SOURCE_DIR]

SOURCE_DIR defaults to ../shared/data/benchmarks (see its README for the files).
Writes src/alignkit/eval/data/<dataset>/<split>.jsonl.gz; the output is reproducible.
"""

from __future__ import annotations

import sys
from pathlib import Path

from alignkit.eval.convert import build_shipped_data

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared/data/benchmarks"
    counts = build_shipped_data(source, ROOT / "src/alignkit/eval/data")
    mmlu = {k: v for k, v in counts.items() if k.startswith("mmlu/")}
    for name, rows in counts.items():
        if not name.startswith("mmlu/"):
            print(f"{name:24} {rows:6d} rows")
    for split in ("test", "dev"):
        total = sum(v for k, v in mmlu.items() if k.endswith(split))
        print(f"mmlu/*/{split:18} {total:6d} rows in {len(mmlu) // 2} subjects")


if __name__ == "__main__":
    main()

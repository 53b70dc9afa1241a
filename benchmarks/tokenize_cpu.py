"""CPU time per row of tokenizing synthetic ShareGPT conversations in one process.

The rate on a shared machine moves with the load on it; CPU time (`time.process_time`)
much less so, which makes this the figure to compare two versions of the tokenization
code by. The rows are those of `tokenize_sharegpt.py` (a system prompt, then 1-3 turns),
converted once and not timed; each repeat times `tokenize.tokenize_examples` on all of
them (the bundled SmolLM2 tokenizer and its template, max_length 1024), single-threaded.

    python benchmarks/tokenize_cpu.py --rows 3000 --repeats 5
    PYTHONPATH=/path/to/old/src python benchmarks/tokenize_cpu.py  # the older code
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    from tokenize_sharegpt import synthesise

    from alignkit.chat_templates import resolve_template
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.data.formats import from_sharegpt
    from alignkit.data.tokenize import tokenize_examples
    from alignkit.models import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer = load_tokenizer(ModelConfig())
    template = resolve_template(None, tokenizer)
    examples = [from_sharegpt(row) for row in synthesise(args.rows)]
    cfg = DataConfig(max_length=1024)
    tokenize_examples(examples[:50], tokenizer, template, cfg)  # warm-up, not timed
    per_row = []
    for _ in range(args.repeats):
        start = time.process_time()
        tokenize_examples(examples, tokenizer, template, cfg)
        per_row.append(1000 * (time.process_time() - start) / args.rows)
    sd = statistics.stdev(per_row) if len(per_row) > 1 else 0.0
    print(
        f"{args.rows} rows, {args.repeats} repeats: "
        f"{statistics.fmean(per_row):.3f} ± {sd:.3f} ms CPU per row",
        flush=True,
    )


if __name__ == "__main__":
    main()

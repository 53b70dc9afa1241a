"""`alignkit serve` under 8 concurrent clients vs the same 8 requests one at a time.

    python benchmarks/serve_concurrency.py                    # the bundled default model
    python benchmarks/serve_concurrency.py --model runs/x/final --repeats 5

One server (the real app on a loopback port, batching on) answers the same greedy chat
requests twice per repeat: one after another from one client, then all at once from
`--clients` threads. Throughput is completion tokens per second of wall time; the ratio
is concurrent over one-at-a-time, reported as mean ± std over the repeats. Greedy answers
must be identical both ways (the batch pads, joins and drops rows; it must not change a
token), and the script exits 1 if they are not.

The last line is machine-readable:
    serve_concurrency_ratio=X serve_concurrency_ratio_std=Y identical=true
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from alignkit import rundir
from alignkit.config import load_recipe
from alignkit.serve import create_app, load_engine

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Give me a tip for learning to cook.",
    "Why do cats purr?",
    "Write one sentence about the sea.",
    "What is two plus two?",
    "Suggest a name for a small dog.",
    "How do plants make food?",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="Model spec; default the bundled one.")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients.")
    parser.add_argument("--max-tokens", type=int, default=48, help="Tokens per answer.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats.")
    parser.add_argument(
        "--dtype", default="auto", help="model.dtype: auto (float32 on CPU), bfloat16, ..."
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads; default torch's choice.")
    return parser.parse_args()


def start_server(app) -> tuple[str, object]:
    import socket

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def ask(url: str, question: str, max_tokens: int) -> tuple[str, int]:
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).json()
    return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]


def timed(run) -> tuple[list[tuple[str, int]], float]:
    started = time.perf_counter()
    answers = run()
    return answers, time.perf_counter() - started


def one_round(url: str, questions: list[str], max_tokens: int) -> dict:
    """Throughput one at a time and all at once, and whether the answers are the same."""
    alone, t_alone = timed(lambda: [ask(url, q, max_tokens) for q in questions])
    with ThreadPoolExecutor(len(questions)) as pool:
        together, t_together = timed(
            lambda: list(pool.map(lambda q: ask(url, q, max_tokens), questions))
        )
    tokens = sum(n for _, n in alone)
    return {
        "alone_tok_s": tokens / t_alone,
        "together_tok_s": sum(n for _, n in together) / t_together,
        "ratio": (sum(n for _, n in together) / t_together) / (tokens / t_alone),
        "identical": [a for a, _ in alone] == [a for a, _ in together],
        "tokens": tokens,
    }


def main() -> int:
    args = parse_args()
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.clients)]
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [("model.name_or_path", args.model), ("model.dtype", args.dtype)]
    recipe = load_recipe(None, settings)
    engine = load_engine(recipe, "bench", max_queue=2 * args.clients, max_batch=args.clients)
    url, server = start_server(create_app(engine))
    ask(url, "Hello!", 4)  # warm-up
    rounds = []
    for i in range(args.repeats):
        result = one_round(url, questions, args.max_tokens)
        rounds.append(result)
        print(
            f"repeat {i + 1}: one at a time {result['alone_tok_s']:.1f} tok/s, "
            f"{args.clients} concurrent {result['together_tok_s']:.1f} tok/s, "
            f"ratio {result['ratio']:.2f}, identical greedy answers: {result['identical']}"
        )
    server.should_exit = True
    ratios = [r["ratio"] for r in rounds]
    mean, std = statistics.mean(ratios), statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    identical = all(r["identical"] for r in rounds)
    summary = {
        "model": args.model,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "dtype": str(next(engine.model.parameters()).dtype),
        "device": str(next(engine.model.parameters()).device),
        "cpu_threads": torch.get_num_threads(),
        "largest_batch": engine.batcher.largest,
        "rounds": rounds,
        "ratio_mean": mean,
        "ratio_std": std,
        "identical": identical,
    }
    dtype = summary["dtype"].removeprefix("torch.")
    out = RESULTS / f"serve_concurrency-{dtype}-{summary['cpu_threads']}threads.json"
    rundir.write_json(out, summary)
    print(
        f"throughput ratio (concurrent / one at a time): {mean:.2f} ± {std:.2f} over "
        f"{len(ratios)} repeats; largest batch {engine.batcher.largest}; results in {out}"
    )
    print(
        f"serve_concurrency_ratio={mean:.2f} serve_concurrency_ratio_std={std:.2f} "
        f"identical={str(identical).lower()}"
    )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

"""Tokenizing synthetic ShareGPT conversations: rows/s and peak RSS, cold, cached and with
two processes.

The conversations (a system prompt, then 1-3 user/assistant turns) are put together from
the shipped data (data/alpaca_en_demo_200.jsonl and data/ultrafeedback_binarized_short_80.jsonl)
and written as one ShareGPT .jsonl file. Each measurement runs in a fresh process and
times what a training stage does with that file: read and convert the rows, then tokenize
them (the bundled SmolLM2 tokenizer and its chat template, max_length 1024):

- `dataset` (the default): `prepared.prepare_sources`, datasets.map with data.num_proc
  workers into the Arrow cache; a cold run (empty $ALIGNKIT_CACHE), then a second run
  that loads the cache by the file's digest (without reading its rows); then N processes
  started together (torch.distributed, gloo) where the main process tokenizes and the
  others load its cache, as `alignkit sft` does.
- `list`: `tokenize.tokenize_examples`, no cache (the old path; run it with PYTHONPATH
  pointing at an older checkout's src to time the code before the cache): one process,
  then N processes started together, each tokenizing the whole file as the old code did.
- `inspect`: `alignkit data inspect FILE --max-length 1024` end to end in a fresh process
  and cache (the command the issue's first figure was taken with), rows in the file per
  second of its wall time; with PYTHONPATH at an older checkout, the old command.

Peak RSS is each process's ru_maxrss; the map workers' peak is reported beside it.

    python benchmarks/tokenize_sharegpt.py --rows 128000 --repeats 2
    PYTHONPATH=/path/to/old/src python benchmarks/tokenize_sharegpt.py --path list --rows 20000
    python benchmarks/tokenize_sharegpt.py --path inspect --rows 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in as few words as the question allows.",
    "You are a careful tutor who explains each step.",
    "You are an expert writer. Keep a friendly, plain tone.",
]


def synthesise(n: int, seed: int = 0) -> list[dict]:
    """n ShareGPT rows: a system prompt, then 1-3 turns drawn from the shipped rows."""
    alpaca = [json.loads(line) for line in (DATA / "alpaca_en_demo_200.jsonl").open()]
    pairs = [json.loads(line) for line in (DATA / "ultrafeedback_binarized_short_80.jsonl").open()]
    turns = [(r["instruction"], r["output"]) for r in alpaca]
    turns += [(p["prompt"], p["chosen"]) for p in pairs if isinstance(p["chosen"], str)]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        conversation = [{"from": "system", "value": rng.choice(SYSTEM_PROMPTS)}]
        for question, answer in rng.sample(turns, rng.randint(1, 3)):
            conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        rows.append({"conversations": conversation})
    return rows


def peak_rss_gb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # kB -> GB


def tokenize_file(path: str, how: str, tokenizer: object) -> int:
    """Read, convert and tokenize the file as a training stage does; returns rows kept."""
    from alignkit.chat_templates import resolve_template
    from alignkit.config import DataConfig, DataSource
    from alignkit.data.sources import load_source

    template = resolve_template(None, tokenizer)
    cfg = DataConfig(max_length=1024)
    if how == "list":
        from alignkit.data.tokenize import tokenize_examples

        examples, _ = load_source(DataSource(path=path))
        rows, _ = tokenize_examples(examples, tokenizer, template, cfg)
        return len(rows)
    from alignkit.data.prepared import prepare_sources

    return len(prepare_sources([DataSource(path=path)], ("sft",), tokenizer, template, cfg).rows)


def worker(args: argparse.Namespace) -> None:
    """One measured run (in its own process); prints one JSON line."""
    from alignkit.config import ModelConfig
    from alignkit.models import load_tokenizer

    rank = int(os.environ.get("RANK", "0"))
    tokenizer = load_tokenizer(ModelConfig())  # not timed: the same in every setting
    if args.world > 1:
        from accelerate import PartialState

        state = PartialState(cpu=True)
        state.wait_for_everyone()
        start = time.perf_counter()
        # the old path: every process tokenizes the file at once; the new: main first
        first = nullcontext() if args.path == "list" else state.local_main_process_first()
        with first:
            kept = tokenize_file(args.file, args.path, tokenizer)
        state.wait_for_everyone()
    else:
        start = time.perf_counter()
        kept = tokenize_file(args.file, args.path, tokenizer)
    seconds = time.perf_counter() - start
    record = {
        "rank": rank,
        "seconds": seconds,
        "kept": kept,
        "rss_gb": peak_rss_gb(resource.RUSAGE_SELF),
        "workers_rss_gb": peak_rss_gb(resource.RUSAGE_CHILDREN),
    }
    print("RESULT " + json.dumps(record), flush=True)


def launch(args: argparse.Namespace, cache: Path, world: int) -> list[dict]:
    """Run `world` worker processes together; their records, by rank."""
    from alignkit.models import cache_dir

    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "gguf").exists():  # the bundled model's tokenizer, converted once
        (cache / "gguf").symlink_to(cache_dir() / "gguf")
    env = {**os.environ, "ALIGNKIT_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + random.randrange(1000)))
    command = [sys.executable, __file__, "--worker", "--file", args.file, "--path", args.path]
    procs = [
        subprocess.Popen(
            [*command, "--world", str(world)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {outputs}")
    lines = [line for out in outputs for line in out.splitlines() if line.startswith("RESULT ")]
    return sorted((json.loads(line[7:]) for line in lines), key=lambda r: r["rank"])


def inspect_run(path: str, cache: Path) -> dict:
    """`alignkit data inspect` on the file in a fresh process and cache: wall time, and the
    largest peak RSS of the command and the tokenizing workers it waited for."""
    from alignkit.models import cache_dir

    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "gguf").exists():
        (cache / "gguf").symlink_to(cache_dir() / "gguf")
    start = time.perf_counter()
    command = subprocess.Popen(
        [sys.executable, "-m", "alignkit", "data", "inspect", path, "--max-length", "1024"],
        env={**os.environ, "ALIGNKIT_CACHE": str(cache)},
        stdout=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(command.pid, 0)  # this command's own usage, not all children's
    seconds = time.perf_counter() - start
    command.returncode = os.waitstatus_to_exitcode(status)
    if command.returncode:
        raise SystemExit(f"alignkit data inspect failed with exit code {command.returncode}")
    return {"seconds": seconds, "rss_gb": usage.ru_maxrss / 2**20, "workers_rss_gb": 0.0}


def spread(values: list[float], digits: int = 2) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def report(name: str, runs: list[list[dict]], rows: int) -> None:
    """One line per measured setting: rows/s (by the slowest rank) and peak RSS per rank."""
    rates = [rows / max(r["seconds"] for r in run) for run in runs]
    line = f"{name:<28} {spread(rates, 0):>14} rows/s  {spread([max(r['seconds'] for r in run) for run in runs], 1):>12} s"
    for rank in range(len(runs[0])):
        rss = [run[rank]["rss_gb"] for run in runs]
        line += f"  rank {rank} peak RSS {spread(rss)} GB"
    workers = [run[0]["workers_rss_gb"] for run in runs]
    if max(workers) > 0:
        line += f" (map workers {spread(workers)} GB)"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--path", choices=["dataset", "list", "inspect"], default="dataset")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.file = str(Path(tmp) / "sharegpt.jsonl")
        with open(args.file, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(r) + "\n" for r in synthesise(args.rows))
        print(
            f"{args.rows} synthetic ShareGPT conversations (1-3 turns, system prompt), "
            f"path={args.path}, {len(os.sched_getaffinity(0))} cores, {args.repeats} repeats"
        )
        if args.path == "inspect":
            runs = [[inspect_run(args.file, Path(tmp) / f"cache{i}")] for i in range(args.repeats)]
            report("data inspect, cold", runs, args.rows)
            return
        if args.path == "list":
            runs = [launch(args, Path(tmp) / f"cache{i}", 1) for i in range(args.repeats)]
            report("list (no cache)", runs, args.rows)
            together = [
                launch(args, Path(tmp) / f"cache{i}", args.processes) for i in range(args.repeats)
            ]
            report(f"list, {args.processes} processes", together, args.rows)
            return
        cold, cached, together = [], [], []
        for i in range(args.repeats):
            cache = Path(tmp) / f"cache{i}"
            cold.append(launch(args, cache, 1))
            cached.append(launch(args, cache, 1))
            together.append(launch(args, Path(tmp) / f"shared{i}", args.processes))
        report("dataset, cold", cold, args.rows)
        report("dataset, cached", cached, args.rows)
        report(f"dataset, {args.processes} processes, cold", together, args.rows)


if __name__ == "__main__":
    main()

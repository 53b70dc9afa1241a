"""alignkit online (GRPO) vs TRL's GRPOTrainer on the same model, prompts and k, one
after the other.

    python benchmarks/online_vs_trl.py                    # bundled SmolLM2-135M, LoRA
    python benchmarks/online_vs_trl.py --repeats 3 --steps 4 --prompts-per-step 4 --k 4
    python benchmarks/online_vs_trl.py --tiny             # a tiny random model: checks the script

Each (tool, repeat) is a fresh subprocess. Both tools train the same thing: GRPO with
LoRA (r 16, alpha 32, all linear layers), the `ifeval` reward on the shipped
IFEval-style prompts in file order, k completions per prompt sampled at temperature 1
up to --max-completion-length tokens, loss_type dapo, beta 0, one update per sample,
gradient checkpointing off. A step's time is measured from its start to its end
(TRL: a trainer callback; alignkit: its metrics' step_seconds); the first step of each
run is a warm-up and is left out. Sampled tokens per second divide the completions'
tokens (stop token included) by the step time (end to end), and for alignkit also by
its sampling time alone. Figures are mean ± sd over --repeats runs; the ratio
alignkit / TRL of the mean step time is printed last (the target is at most 0.7).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from worker_jobs import run_worker

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "data" / "ifeval_style_prompts_200.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def read_prompts(n: int) -> list[dict[str, Any]]:
    lines = PROMPTS.read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def run_alignkit(job: dict[str, Any]) -> dict[str, Any]:
    from alignkit.config import load_recipe
    from alignkit.rundir import read_metrics
    from alignkit.train.online import train_online

    data = Path(job["work"]) / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_prompts(job["rows"])))
    overrides = {
        "model.name_or_path": job["model"],
        "model.adapter": "lora",
        "lora.r": 16,
        "lora.alpha": 32,
        "lora.dropout": 0.0,
        "data.sources": str(data),
        "data.max_length": 512,
        "train.output_dir": job["out"],
        "train.max_steps": job["steps"],
        "train.micro_batch_size": job["prompts_per_step"],
        "train.learning_rate": 1e-5,
        "train.scheduler": "constant",
        "train.seed": job["seed"],
        "online.num_generations": job["k"],
        "online.max_completion_length": job["max_completion_length"],
        "online.rewards": "ifeval",
        "online.loss_type": "dapo",
    }
    recipe = load_recipe(None, [(k, str(v)) for k, v in overrides.items()])
    out = train_online(recipe)
    records = read_metrics(out / "metrics.jsonl")[1:]  # the first step warms up
    return {
        "step_s": [r["step_seconds"] for r in records],
        "sampled_tokens": [
            r["completions/mean_length"] * job["prompts_per_step"] * job["k"] for r in records
        ],
        "sampling_tokens_per_s": [r["sampling_tokens_per_s"] for r in records],
        "train_tokens_per_s": [r["train_tokens_per_s"] for r in records],
    }


def ifeval_for_trl(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
    """TRL's reward signature over alignkit's ifeval reward."""
    from alignkit.rewards.base import Prompt
    from alignkit.rewards.verifiable import ifeval_reward

    rows = [
        Prompt(p, {"instruction_id_list": i, "kwargs": k})
        for p, i, k in zip(prompts, columns["instruction_id_list"], columns["kwargs"], strict=True)
    ]
    return ifeval_reward(rows, [c[-1]["content"] for c in completions])


def run_trl(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "instruction_id_list": r["instruction_id_list"],
            "kwargs": [json.dumps(k) for k in r["kwargs"]],
        }
        for r in read_prompts(job["rows"])
    ]

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        columns["kwargs"] = [[json.loads(k) for k in ks] for ks in columns["kwargs"]]
        return ifeval_for_trl(prompts, completions, **columns)

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.started)

    args = GRPOConfig(
        output_dir=job["out"],
        per_device_train_batch_size=job["prompts_per_step"] * job["k"],
        num_generations=job["k"],
        max_completion_length=job["max_completion_length"],
        max_steps=job["steps"],
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        loss_type="dapo",
        beta=0.0,
        temperature=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=False,
        use_cpu=job["device"] == "cpu",
        bf16=False,
        seed=job["seed"],
        shuffle_dataset=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    times = StepTimes()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[times],
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "completions/mean_length" in r][1:]
    n = job["prompts_per_step"] * job["k"]
    return {
        "step_s": times.times[1:],
        "sampled_tokens": [r["completions/mean_length"] * n for r in logs],
    }


def worker(path: Path) -> None:
    job = json.loads(path.read_text())
    result = (run_trl if job["tool"] == "trl" else run_alignkit)(job)
    Path(job["result"]).write_text(json.dumps(result))


def run_job(job: dict[str, Any], work: Path, log: Path) -> dict[str, Any]:
    name = f"{job['tool']}-{job['seed']}"
    path = work / f"{name}.json"
    job |= {"result": str(work / f"{name}.result.json"), "out": str(work / f"out-{name}")}
    path.write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return run_worker(__file__, path, env, log)


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):8.2f} ± {sd:6.2f}"


def per_run(result: dict[str, Any]) -> dict[str, float]:
    """One run's means over its measured steps."""
    steps, tokens = result["step_s"], result["sampled_tokens"]
    figures = {
        "step_s": statistics.fmean(steps),
        "end_to_end_sampled_tokens_per_s": sum(tokens) / sum(steps),
    }
    for key in ("sampling_tokens_per_s", "train_tokens_per_s"):
        if key in result:
            figures[key] = statistics.fmean(result[key])
    return figures


def tiny_model(work: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from support import make_tiny_llama

    from alignkit.config import ModelConfig
    from alignkit.models import load_tokenizer

    return str(make_tiny_llama(load_tokenizer(ModelConfig()), work / "tiny-model"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--tiny", action="store_true", help="A tiny random model (checks the script)."
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--steps", type=int, default=4, help="Steps per run (the first is warm-up)."
    )
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument(
        "--out", type=Path, default=None, help="Results JSON (default under benchmarks/results)."
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    run_all(args)


def run_all(args: argparse.Namespace) -> None:
    import torch

    from alignkit.models import resolve

    work = Path(tempfile.mkdtemp(prefix="online-vs-trl-"))
    model = tiny_model(work) if args.tiny else resolve("default").path
    log = work / "log.txt"
    base = {
        "model": model,
        "work": str(work),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "rows": args.steps * args.prompts_per_step,
        "steps": args.steps,
        "prompts_per_step": args.prompts_per_step,
        "k": args.k,
        "max_completion_length": args.max_completion_length,
    }
    runs: dict[str, list[dict[str, float]]] = {"trl": [], "alignkit": []}
    for seed in range(args.repeats):
        for tool in runs:  # one after the other, alternating
            runs[tool].append(per_run(run_job({**base, "tool": tool, "seed": seed}, work, log)))
    threads = torch.get_num_threads()
    print(
        f"GRPO LoRA, {Path(model).name}, {args.prompts_per_step} prompts x k={args.k}, up to "
        f"{args.max_completion_length} tokens, {args.steps - 1} measured steps x {args.repeats} runs, "
        f"{base['device']} ({threads} threads); log {log}"
    )
    for tool, results in runs.items():
        line = "  ".join(f"{key} {mean_sd([r[key] for r in results])}" for key in results[0])
        print(f"  {tool:9s} {line}")
    ratio = statistics.fmean(r["step_s"] for r in runs["alignkit"]) / statistics.fmean(
        r["step_s"] for r in runs["trl"]
    )
    tps = statistics.fmean(
        r["end_to_end_sampled_tokens_per_s"] for r in runs["alignkit"]
    ) / statistics.fmean(r["end_to_end_sampled_tokens_per_s"] for r in runs["trl"])
    print(
        f"step time alignkit/TRL = {ratio:.2f} (target <= 0.7); sampled tok/s alignkit/TRL = {tps:.2f}"
    )
    out = (
        args.out
        or RESULTS / f"online_vs_trl-{'tiny' if args.tiny else 'smollm2'}-{threads}threads.json"
    )
    out.write_text(
        json.dumps(
            {"settings": base | {"repeats": args.repeats}, "runs": runs, "step_time_ratio": ratio},
            indent=1,
        )
    )
    print(f"step_time_ratio={ratio:.3f} sampled_tps_ratio={tps:.3f}")


if __name__ == "__main__":
    main()

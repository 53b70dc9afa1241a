"""alignkit vs TRL on the same model, data and hyperparameters, one after the other.

    python benchmarks/train_vs_trl.py            # every workload, both modes
    python benchmarks/train_vs_trl.py --workloads dpo_lora --modes best

Each (workload, mode, tool) run is a fresh subprocess, so its peak memory (RSS on CPU,
`torch.cuda.max_memory_allocated` on CUDA) is its own. Both tools get the same
tokens: alignkit tokenizes the rows (max_length 512, its truncation), and TRL is
handed exactly those token ids, pre-tokenized, in alignkit's training order (a
sequential sampler). Gradient checkpointing is off for both (TRL 1.16 turns it on by
default; it trades time for memory).

Modes:
- like: the same features on both: padded batches, the model's full logits, a live
  reference pass every step. Short by default (--like-steps) since it is for
  parity of the step-1 figures and per-step cost.
- best: each tool in its fastest documented configuration that trains the same
  thing. TRL: precomputed reference log-probs (its padding-free DPO is disabled in
  TRL 1.16; its padding-free SFT needs FlashAttention to keep examples apart, so on
  sdpa it would let them attend to each other). alignkit: its defaults (padding-free
  rows, shared prompts, chunked log-probs) plus a precomputed reference.

Model FLOP utilisation counts the FLOPs of the plain computation of the workload's
tokens, the same numerator for both tools: 2 x parameters (input embedding excluded,
output layer included) per token per forward, times 3 for a full-weight training
pass, 2 for LoRA (no weight gradients), plus 1 for a reference forward; divided by
the wall time of training and by a float32 (CUDA: bfloat16) matmul peak measured at
the start of the run.

The last line is machine-readable (best mode):
    dpo_lora_speedup=X dpo_lora_memory=Y sft_lora_speedup=Z
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from worker_jobs import run_worker

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "train"
TOOLS = ("trl", "alignkit")
MODES = ("like", "best")
PAIR_METRICS = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]


@dataclass
class Workload:
    kind: str  # "pref" or "sft"
    adapter: str  # "lora" or "none"
    source: str
    rows: int
    batch: int
    learning_rate: float


WORKLOADS = {
    "dpo_lora": Workload("pref", "lora", "ultrafeedback_binarized_1k.jsonl", 64, 2, 5e-5),
    "dpo_full": Workload("pref", "none", "ultrafeedback_binarized_1k.jsonl", 16, 2, 5e-7),
    "sft_lora": Workload("sft", "lora", "alpaca_5000.json", 256, 8, 2e-4),
}


# ---------------------------------------------------------------- shared settings


def recipe_overrides(w: Workload, model: str, data: Path, max_length: int) -> dict[str, Any]:
    """The alignkit recipe both tools' settings are derived from."""
    return {
        "model.name_or_path": model,
        "model.adapter": w.adapter,
        "data.sources": str(data),
        "data.max_length": max_length,
        "train.micro_batch_size": w.batch,
        "train.epochs": 1,
        "train.learning_rate": w.learning_rate,
        "train.scheduler": "constant",
        "train.max_grad_norm": 1.0,
        "train.seed": 0,
        "lora.r": 16,
        "lora.alpha": 16,
        "lora.dropout": 0.0,
        "lora.target_modules": "all-linear",
        "pref.loss": "sigmoid",
        "pref.beta": 0.1,
    }


def load_recipe_from(overrides: dict[str, Any]) -> Any:
    from alignkit.config import load_recipe

    return load_recipe(None, [(k, str(v)) for k, v in overrides.items()])


def prepare_data(w: Workload, model: str, max_length: int, work: Path) -> dict[str, Any]:
    """alignkit's rows for the workload, and their token ids in alignkit's training order."""
    from alignkit.train.loop import epoch_order
    from alignkit.train.stage import load_stage_data

    source = SHARED / w.source
    if not source.is_file():
        raise SystemExit(
            f"{source}: not found. The benchmark reads ../shared/data/train beside "
            "the project; put the file there or pick other --workloads."
        )
    raw = (
        json.loads(source.read_text())
        if source.suffix == ".json"
        else [json.loads(line) for line in source.read_text().splitlines()]
    )
    subset = work / f"alignkit{source.suffix}"
    take = w.rows
    while True:  # rows dropped as too long are replaced by the next ones
        write_rows(subset, raw[:take])
        recipe = load_recipe_from(recipe_overrides(w, model, subset, max_length))
        kinds = ("pair",) if w.kind == "pref" else ("sft",)
        data = load_stage_data(recipe, kinds)
        if len(data.train_rows) >= w.rows:
            break
        take += w.rows - len(data.train_rows)
    rows = data.train_rows
    order = epoch_order(len(rows), recipe.train.seed, 0)
    if w.kind == "pref":
        ids = [
            {
                "prompt_ids": rows[i].prompt_ids,
                "chosen_ids": rows[i].chosen_ids,
                "rejected_ids": rows[i].rejected_ids,
            }
            for i in order
        ]
    else:
        ids = [
            {
                "input_ids": rows[i].input_ids,
                "completion_mask": [int(m) for m in rows[i].labels_mask],
            }
            for i in order
        ]
    (work / "ids.json").write_text(json.dumps(ids))
    return {
        "alignkit_data": str(subset),
        "ids": str(work / "ids.json"),
        "rows": len(rows),
        "tokens": sum(row_tokens(r) for r in ids),
    }


def row_tokens(r: dict[str, list[int]]) -> int:
    """Non-padding tokens of a plain forward: a pair's prompt counts twice."""
    if "prompt_ids" in r:
        return 2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
    return len(r["input_ids"])


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- workers


def peak_memory(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_alignkit(w: Workload, job: dict[str, Any]) -> dict[str, Any]:
    from alignkit.rundir import read_metrics

    overrides = recipe_overrides(w, job["model"], Path(job["alignkit_data"]), job["max_length"])
    overrides["train.output_dir"] = job["out"]
    if job["max_steps"]:
        overrides["train.max_steps"] = job["max_steps"]
    if job["mode"] == "like":
        overrides.update({"train.padding_free": False, "train.logps_chunk": 0})
    elif w.kind == "pref":
        overrides["pref.precompute_ref"] = True
    recipe = load_recipe_from(overrides)
    started = time.perf_counter()
    if w.kind == "pref":
        from alignkit.train.pref import train_pref

        out = train_pref(recipe)
    else:
        from alignkit.train.sft import train_sft

        out = train_sft(recipe)
    wall = time.perf_counter() - started
    records = read_metrics(out / "metrics.jsonl")
    info = json.loads((out / "run_info.json").read_text())
    return {
        "wall_s": wall,
        "train_s": info["train_seconds"],
        "steps": records[-1]["step"],
        "step1": records[0],
        "last_loss": records[-1]["loss"],
    }


def trl_args(w: Workload, job: dict[str, Any]) -> Any:
    import trl

    common = dict(
        output_dir=job["out"],
        per_device_train_batch_size=w.batch,
        num_train_epochs=1,
        max_steps=job["max_steps"] or -1,
        learning_rate=w.learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        seed=0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        max_length=None,
        pad_to_multiple_of=None,
        gradient_checkpointing=False,
        bf16=job["device"] == "cuda",
        use_cpu=job["device"] == "cpu",
        dataloader_num_workers=0,
    )
    if w.kind == "pref":
        best = job["mode"] == "best"
        return trl.DPOConfig(
            **common, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=best
        )
    return trl.SFTConfig(**common, completion_only_loss=True, packing=False)


def run_trl(w: Workload, job: dict[str, Any]) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = trl.DPOTrainer if w.kind == "pref" else trl.SFTTrainer
    ids = json.loads(Path(job["ids"]).read_text())

    class Same(base):
        """TRL trains on alignkit's token ids, in alignkit's order."""

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return SequentialSampler(self.train_dataset)

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            if w.kind == "sft":  # pre-tokenized: TRL only turns completion_mask into labels
                return super()._prepare_dataset(dataset, *args, **kwargs)
            return Dataset.from_list(ids)  # DPO would re-tokenize (and add EOS to cut rows)

    dtype = torch.bfloat16 if job["device"] == "cuda" else torch.float32
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype).to(job["device"])
    peft_config = None
    if w.adapter == "lora":
        peft_config = LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    trainer = Same(
        model=model,
        args=trl_args(w, job),
        train_dataset=Dataset.from_list(ids),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    output = trainer.train()
    wall = time.perf_counter() - started
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return {
        "wall_s": wall,
        "train_s": output.metrics["train_runtime"],
        "steps": trainer.state.global_step,
        "step1": logs[0],
        "last_loss": logs[-1]["loss"],
    }


def worker(job_path: Path) -> None:
    job = json.loads(job_path.read_text())
    w = Workload(**job["workload"])
    result = (run_trl if job["tool"] == "trl" else run_alignkit)(w, job)
    result["peak_memory"] = peak_memory(job["device"])
    Path(job["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- measuring


def matmul_peak(device: str) -> float:
    """Best FLOP/s of a square matmul (float32 on CPU, bfloat16 on CUDA)."""
    import torch

    dtype, size = (torch.bfloat16, 8192) if device == "cuda" else (torch.float32, 2048)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def flops_per_token(model_path: str, adapter: str, kind: str) -> float:
    """Plain-computation training FLOPs per token (see the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters()) - embed
    if config.tie_word_embeddings:
        params += embed  # the tied matrix is used again as the output layer
    passes = 3 if adapter == "none" else 2
    return 2 * params * (passes + (1 if kind == "pref" else 0))


def run_job(job: dict[str, Any], work: Path, log: Path) -> dict[str, Any]:
    path = work / f"{job['tool']}-{job['name']}-{job['mode']}.json"
    job["result"] = str(path.with_suffix(".result.json"))
    job["out"] = str(work / f"out-{job['tool']}-{job['name']}-{job['mode']}")
    path.write_text(json.dumps(job))
    env = {
        **os.environ,
        "ALIGNKIT_CACHE": str(work / f"cache-{path.stem}"),
        "HF_DATASETS_CACHE": str(work / f"datasets-{path.stem}"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return run_worker(__file__, path, env, log)


def row(tool: str, r: dict[str, Any], tokens: int, flops: float, peak: float) -> str:
    step1 = r["step1"]
    extras = " ".join(f"{k}={step1[k]:.4f}" for k in PAIR_METRICS[1:] if k in step1)
    mfu = flops * tokens / r["wall_s"] / peak
    return (
        f"  {tool:9s} wall {r['wall_s']:7.1f} s  {tokens / r['wall_s']:6.1f} tok/s  "
        f"{r['train_s'] / r['steps']:6.2f} s/step  peak {r['peak_memory'] / 2**30:5.2f} GiB  "
        f"MFU {100 * mfu:5.2f}%  step-1 loss {step1['loss']:.6f} {extras}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"Comma-separated, from {', '.join(WORKLOADS)}.",
    )
    parser.add_argument("--modes", default=",".join(MODES), help="like, best or both.")
    parser.add_argument("--model", default="default", help="alignkit model spec.")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--like-steps",
        type=int,
        default=4,
        help="Optimizer steps in like-for-like mode; 0 = the whole epoch.",
    )
    parser.add_argument(
        "--rows", type=int, default=0, help="Override every workload's row count (a quick look)."
    )
    parser.add_argument("--out", default=None, help="Write every figure to this JSON file.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker))
        return
    run_all(args)


def run_all(args: argparse.Namespace) -> None:
    import torch

    from alignkit.models import resolve

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = resolve(args.model).path
    peak = matmul_peak(device)
    print(f"device {device}, {torch.get_num_threads()} threads; model {model}")
    print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s")
    work = Path(tempfile.mkdtemp(prefix="alignkit-bench-"))
    log = work / "log.txt"
    print(f"logs: {log}")
    figures: dict[str, Any] = {"peak_flops": peak, "device": device, "runs": {}}
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        if args.rows:
            w = Workload(**{**asdict(w), "rows": args.rows})
        data_dir = work / name
        data_dir.mkdir()
        data = prepare_data(w, model, args.max_length, data_dir)
        flops = flops_per_token(model, w.adapter, w.kind)
        for mode in args.modes.split(","):
            steps = args.like_steps if mode == "like" else 0
            tokens = data["tokens"] if not steps else None
            print(
                f"\n{name} [{mode}] {data['rows']} rows"
                + (f", {steps} steps" if steps else ", 1 epoch")
            )
            results = {}
            for tool in TOOLS:
                job = {
                    "tool": tool,
                    "name": name,
                    "mode": mode,
                    "workload": asdict(w),
                    "model": model,
                    "max_length": args.max_length,
                    "max_steps": steps,
                    "device": device,
                    **data,
                }
                results[tool] = run_job(job, work, log)
                used = tokens or steps_tokens(data, w, steps)
                print(row(tool, results[tool], used, flops, peak), flush=True)
            trl_r, ours = results["trl"], results["alignkit"]
            speedup, memory = (
                trl_r["wall_s"] / ours["wall_s"],
                ours["peak_memory"] / trl_r["peak_memory"],
            )
            diffs = agreement(trl_r, ours)
            print(
                f"  ratios: speedup {speedup:.2f}x  memory {memory:.2f}x  "
                + "  ".join(f"{k} |diff| {v:.1e}" for k, v in diffs.items())
            )
            figures["runs"][f"{name}/{mode}"] = {
                **results,
                "speedup": speedup,
                "memory": memory,
                **diffs,
            }
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    print()
    print(final_line(figures["runs"]))


def agreement(trl_r: dict[str, Any], ours: dict[str, Any]) -> dict[str, float]:
    """How far apart the two tools' numbers are: step-1 loss, the largest step-1 metric
    gap (summed log-probs included), and the last step's loss."""
    shared = [k for k in PAIR_METRICS if k in trl_r["step1"] and k in ours["step1"]]
    return {
        "step-1 loss": abs(trl_r["step1"]["loss"] - ours["step1"]["loss"]),
        "step-1 metrics": max(abs(trl_r["step1"][k] - ours["step1"][k]) for k in shared),
        "last loss": abs(trl_r["last_loss"] - ours["last_loss"]),
    }


def steps_tokens(data: dict[str, Any], w: Workload, steps: int) -> int:
    """Tokens in the first `steps` micro-batches (the ids file is in training order)."""
    return sum(row_tokens(r) for r in json.loads(Path(data["ids"]).read_text())[: steps * w.batch])


def final_line(runs: dict[str, Any]) -> str:
    def get(key: str, field: str) -> str:
        return f"{runs[key][field]:.2f}" if key in runs else "nan"

    return (
        f"dpo_lora_speedup={get('dpo_lora/best', 'speedup')} "
        f"dpo_lora_memory={get('dpo_lora/best', 'memory')} "
        f"sft_lora_speedup={get('sft_lora/best', 'speedup')}"
    )


if __name__ == "__main__":
    main()

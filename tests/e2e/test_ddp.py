"""Two CPU processes (gloo) under DDP and FSDP2 train like one process with the same
global batch, resume exactly, update once per logged step, and write from one process.

Each launch trains a 12-row set with 2 rows per process and 2 micro-batches per step,
so the third micro-batch of an epoch makes a short step of its own (the epoch's tail);
3 steps cross into the second epoch. The single-process run it is compared with
accumulates 4 micro-batches of 2 rows: the same 8, 4 and 8 rows in its 3 steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import write_jsonl

from alignkit.config import load_recipe, parse_overrides
from alignkit.rundir import read_metrics
from alignkit.train.pref import train_pref
from alignkit.train.sft import train_sft

WORKER = Path(__file__).with_name("ddp_worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"
STEPS = 3
ROWS = {
    "sft": [
        {"instruction": f"task {i}", "output": f"answer {i} " * (1 + i % 3)} for i in range(12)
    ],
    "pref": [
        {"prompt": f"task {i}", "chosen": f"good {i}", "rejected": f"bad answer {i} " * (1 + i % 2)}
        for i in range(12)
    ],
}
TRAIN = {"sft": train_sft, "pref": train_pref}
WEIGHTS = {"lora": "adapter_model.safetensors", "none": "model.safetensors"}
CASES = {  # stage, adapter, backend, extra settings
    "sft-full-ddp": ("sft", "none", "ddp", []),
    "sft-lora-fsdp2": ("sft", "lora", "fsdp2", ["data.eval_sources={eval3}"]),  # uneven eval
    "pref-lora-ddp": (
        "pref",
        "lora",
        "ddp",
        ["pref.precompute_ref=true", "data.eval_sources={eval1}"],
    ),
    "pref-full-fsdp2": (
        "pref",
        "none",
        "fsdp2",
        ["data.eval_sources={eval1}", "train.eval_on_start=true"],  # rank 1: no eval row
    ),
}


def overrides(directory: Path, model_dir: Path, case: str) -> list[str]:
    """The settings both runs of a case share; its data files are written in `directory`."""
    stage, adapter, _, extra = CASES[case]
    data = write_jsonl(directory / "d.jsonl", ROWS[stage])
    evals = {
        "eval3": write_jsonl(directory / "e3.jsonl", ROWS[stage][:3]),
        "eval1": write_jsonl(directory / "e1.jsonl", ROWS[stage][:1]),
    }
    return [
        f"model.name_or_path={model_dir}",
        "model.device=cpu",
        f"model.adapter={adapter}",
        f"data.sources={data}",
        f"train.max_steps={STEPS}",
        "train.gradient_accumulation_steps=2",
        "train.save_steps=1",
        "train.learning_rate=1e-2",
        "lora.dropout=0",  # dropout masks are drawn per process: no match to compare
        *(["pref.loss=sigmoid"] if stage == "pref" else []),
        *[e.format(**evals) for e in extra],
    ]


def launch(root: Path, backend: str) -> None:
    """Run root/jobs.json in 2 CPU processes."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 500),
        str(WORKER),
        str(root),
        backend,
    ]
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir):
    """backend -> the dir its cases ran in: one launch per backend runs all its cases."""
    roots: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in roots:
            root = tmp_path_factory.mktemp(backend)
            jobs = []
            for case in [c for c in CASES if CASES[c][2] == backend]:
                directory = root / case
                directory.mkdir()
                settings = overrides(directory, tiny_model_dir, case)
                two = [f"train.output_dir={directory / 'two'}", "train.micro_batch_size=2"]
                jobs.append(
                    {
                        "name": case,
                        "stage": CASES[case][0],
                        "cache": str(directory / "cache-two"),
                        "overrides": settings + two,
                    }
                )
            (root / "jobs.json").write_text(json.dumps(jobs))
            launch(root, backend)
            roots[backend] = root
        return roots[backend]

    return get


def one_process(tmp_path: Path, stage: str, settings: list[str]) -> Path:
    cfg = [
        *settings,
        f"train.output_dir={tmp_path / 'one'}",
        "train.micro_batch_size=2",
        "train.gradient_accumulation_steps=4",
    ]
    return TRAIN[stage](load_recipe(None, parse_overrides(cfg)))


def losses(out: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if key in r]


def assert_same_weights(a: Path, b: Path, adapter: str, atol: float) -> None:
    left, right = load_file(a / WEIGHTS[adapter]), load_file(b / WEIGHTS[adapter])
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_resume_exactly_and_step_once_per_logged_step(
    launched, tiny_model_dir, monkeypatch, case
):
    stage, adapter, backend, _ = CASES[case]
    directory = launched(backend) / case
    ranks = [json.loads((directory.parent / f"{case}-rank{r}.json").read_text()) for r in (0, 1)]
    settings = overrides(directory, tiny_model_dir, case)
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["distributed_type"].endswith("FSDP" if backend == "fsdp2" else "MULTI_CPU")
    two = directory / "two" / "full"

    # (c) one optimizer update per logged step, counted on each process: 3 steps of
    # 2, 1 (the epoch's tail) and 2 micro-batches, gradients synced on each step's last
    for rank in ranks:
        assert rank["optimizer_steps"][0] == STEPS
        assert rank["backward_syncs"][0] == [False, True, True, False, True]
    assert [r["step"] for r in read_metrics(two / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    # every row once per epoch, each micro-batch split over the two processes
    seen = ranks[0]["rows"][:6] + ranks[1]["rows"][:6]
    assert sorted(seen) == list(range(12))

    # (a) equal to one process with the same global batch
    monkeypatch.setenv("ALIGNKIT_CACHE", str(directory / "cache-one"))
    one = one_process(directory, stage, settings)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert_same_weights(two, one, adapter, atol=1e-4)  # Adam at lr 1e-2: 1% of a step
    if "eval_loss" in read_metrics(one / "metrics.jsonl")[-1]:  # (d) uneven eval shards
        assert losses(two, "eval_loss") == pytest.approx(losses(one, "eval_loss"), rel=1e-5)
    if "train.eval_on_start=true" in settings:
        # step 0: policy = reference, so the one pair's loss is -log sigmoid(0) = log 2
        assert read_metrics(two / "metrics.jsonl")[0]["eval_loss"] == pytest.approx(math.log(2))
    if "pref.precompute_ref=true" in settings:  # the cache the two processes gathered
        cached = sorted((directory / "cache-two" / "ref_logps").glob("*.safetensors"))
        alone = sorted((directory / "cache-one" / "ref_logps").glob("*.safetensors"))
        assert [p.name for p in cached] == [p.name for p in alone] and len(cached) == 2
        for mine, theirs in zip(cached, alone, strict=True):  # train and eval pairs
            assert torch.equal(load_file(mine)["ref_logps"], load_file(theirs)["ref_logps"])

    # (b) killed after its first checkpoint and resumed: the uninterrupted run, exactly
    cut = directory / "two" / "cut"
    assert losses(cut) == losses(two)
    assert_same_weights(cut, two, adapter, atol=0)
    assert [rank["optimizer_steps"][1:] for rank in ranks] == [[1, STEPS - 1]] * 2
    # each process resumed its own RNG state (the processes' states differ)
    assert [rank["rng_end"][2] for rank in ranks] == [rank["rng_end"][0] for rank in ranks]
    assert ranks[0]["rng_end"][0] != ranks[1]["rng_end"][0]

    # (e) one process writes the outputs and the metrics
    assert ranks[1]["saved"] == [] and ranks[1]["metrics_lines"] == []
    assert ranks[0]["saved"] == [str(two), str(cut)]
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_dry_run_under_accelerate_launch_prints_the_batches_once(tmp_path, tiny_model_dir):
    import yaml

    sft = write_jsonl(tmp_path / "sft.jsonl", ROWS["sft"])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", ROWS["pref"])
    recipe = {
        "name": "tiny",
        "model": {"name_or_path": str(tiny_model_dir), "adapter": "lora", "device": "cpu"},
        "train": {"micro_batch_size": 2, "gradient_accumulation_steps": 2},
        "stages": [
            {"stage": "sft", "data": {"sources": [str(sft)]}, "train": {"epochs": 2}},
            {"stage": "merge", "id": "sft-merged"},
            {"stage": "pref", "data": {"sources": [str(pairs)]}, "train": {"max_steps": 3}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    command = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29000 + os.getpid() % 500),
        "-m",
        "alignkit.cli",
        "run",
        str(path),
        "--dry-run",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # 12 rows, 2 per device on 2 processes: 3 global micro-batches an epoch, 2 steps
    sft_line = "sft: 2 processes x 2 rows per device x 2 accumulated = global batch 8"
    assert f"{sft_line}; 12 rows, at most 4 steps (2 epoch(s))" in out
    assert "pref: 2 processes x 2 rows per device x 2 accumulated = global batch 8" in out
    assert "3 steps (train.max_steps)" in out
    assert out.count("recipe is valid") == 1  # printed by the main process only
    assert not (tmp_path / "run").exists()

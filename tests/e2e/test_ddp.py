from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import write_jsonl

from alignkit.rundir import read_metrics

WORKER = Path(__file__).with_name("ddp_worker.py")


STAGES = {
    "sft": ([{"instruction": f"task {i}", "output": f"answer {i}"} for i in range(8)], []),
    "pref": (
        [
            {"prompt": f"task {i}", "chosen": f"good {i}", "rejected": f"bad answer {i}"}
            for i in range(8)
        ],
        ["model.adapter=lora", "pref.loss=sigmoid", "train.learning_rate=1e-2"],
    ),
}


def launch(tmp_path: Path, model_dir: Path, stage: str, extra: list[str]) -> list[dict]:
    """Train `stage` on its 8 rows in 2 CPU processes; each rank's report."""
    data = write_jsonl(tmp_path / "d.jsonl", STAGES[stage][0])
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
        "29517",
        str(WORKER),
        stage,
        str(tmp_path),
        *extra,
        f"model.name_or_path={model_dir}",
        "model.device=cpu",
        f"data.sources={data}",
        f"train.output_dir={tmp_path / 'out'}",
        "train.micro_batch_size=2",
        "train.max_steps=2",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_split_the_batch_and_end_identical(tmp_path, tiny_model_dir, stage):
    extra = STAGES[stage][1]
    ranks = launch(tmp_path, tiny_model_dir, stage, extra)
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # 2 steps x 2 processes x 2 rows: all 8 rows seen once, none by both ranks
    assert sorted(ranks[0]["rows"] + ranks[1]["rows"]) == list(range(8))
    assert ranks[0]["saved"] == [str(tmp_path / "out")] and ranks[1]["saved"] == []
    weights = "adapter_model.safetensors" if extra else "model.safetensors"
    assert (tmp_path / "out" / weights).is_file()


def test_pref_eval_with_fewer_rows_than_processes(tmp_path, tiny_model_dir):
    """Rank 1 has no eval row: it still takes part in the eval all-reduce, adding nothing."""
    one = write_jsonl(tmp_path / "eval.jsonl", STAGES["pref"][0][:1])
    extra = [*STAGES["pref"][1], f"data.eval_sources={one}", "train.eval_on_start=true"]
    ranks = launch(tmp_path, tiny_model_dir, "pref", extra)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    # step 0: policy = reference, so the one pair's loss is -log sigmoid(0) = log 2
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval_rewards/accuracies"] == 0.0  # a tie is no win

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import write_jsonl

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


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_split_the_batch_and_end_identical(tmp_path, tiny_model_dir, stage):
    rows, extra = STAGES[stage]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
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
        f"model.name_or_path={tiny_model_dir}",
        "model.device=cpu",
        f"data.sources={data}",
        f"train.output_dir={tmp_path / 'out'}",
        "train.micro_batch_size=2",
        "train.max_steps=2",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # 2 steps x 2 processes x 2 rows: all 8 rows seen once, none by both ranks
    assert sorted(ranks[0]["rows"] + ranks[1]["rows"]) == list(range(8))
    assert ranks[0]["saved"] == [str(tmp_path / "out")] and ranks[1]["saved"] == []
    weights = "adapter_model.safetensors" if extra else "model.safetensors"
    assert (tmp_path / "out" / weights).is_file()

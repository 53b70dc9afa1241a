"""Run by tests/e2e/test_ddp.py under `accelerate launch --num_processes 2`: trains (stage
sft or pref), then records per rank which rows it saw, a hash of its final weights, and
whether it saved. Usage: ddp_worker.py STAGE REPORT_DIR OVERRIDES..."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import alignkit.train.loop as loop
import alignkit.train.pref as pref
import alignkit.train.sft as sft
import alignkit.train.stage as stage
from alignkit.config import load_recipe, parse_overrides

TRAIN = {"sft": sft.train_sft, "pref": pref.train_pref}
train = TRAIN[sys.argv[1]]

seen: list[int] = []
saved: list[str] = []
captured: dict = {}
rank_rows = loop.rank_rows
save_outputs = stage.save_outputs
run_loop = stage.run_loop


def capture_model(parts, resume_from=None):
    captured["model"] = parts.model
    return run_loop(parts, resume_from)


def record_rows(order, micro_batch, cfg, rank, world):
    rows = rank_rows(order, micro_batch, cfg, rank, world)
    seen.extend(rows)
    return rows


def record_save(run, state_dict, directory):
    saved.append(str(run.out))
    return save_outputs(run, state_dict, directory)


loop.rank_rows = record_rows
stage.save_outputs = record_save
stage.run_loop = capture_model
report = Path(sys.argv[2])
recipe = load_recipe(None, parse_overrides(sys.argv[3:]))
out = train(recipe)

from accelerate import PartialState  # noqa: E402

state = PartialState()
digest = hashlib.sha256()
model = captured["model"]
for name, param in sorted(model.state_dict().items()):
    digest.update(name.encode() + param.detach().cpu().numpy().tobytes())
(report / f"rank{state.process_index}.json").write_text(
    json.dumps(
        {"rows": seen, "weights": digest.hexdigest(), "saved": saved, "world": state.num_processes}
    )
)

"""Run by tests/e2e/test_ddp.py under `accelerate launch --num_processes 2` (CPU, gloo).

Usage: ddp_worker.py REPORT_DIR BACKEND
  BACKEND  ddp, or fsdp2: Accelerate's FSDP2 preparation, checkpointing and gathering.
           Accelerate 1.15 switches to FSDP only on an accelerator device (its
           AcceleratorState leaves MULTI_CPU out), so this worker sets the distributed
           type to FSDP itself; everything after that is Accelerate's and torch's own
           FSDP2 code (fully_shard, DTensor, torch.distributed.checkpoint) over gloo.

REPORT_DIR/jobs.json lists the jobs: {name, stage (sft or pref), cache, overrides}. Each
job trains into OUT/full; then into OUT/cut, killed after its first checkpoint; then
resumes OUT/cut from it in the same processes (OUT: the job's train.output_dir).

Each rank writes <job>-rank<i>.json: the rows it trained on, its optimizer updates, the
gradient-sync flag of every backward, what it wrote (final outputs, metrics lines), and
where its Python RNG ended each run (each rank moves it on by a different amount per
micro-batch, so restoring another rank's state shows).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import replace
from pathlib import Path

from accelerate import Accelerator

import alignkit.rundir as rundir
import alignkit.train.loop as loop
import alignkit.train.pref as pref
import alignkit.train.sft as sft
import alignkit.train.stage as stage
from alignkit.config import load_recipe, parse_overrides

TRAIN = {"sft": sft.train_sft, "pref": pref.train_pref}
report, backend = Path(sys.argv[1]), sys.argv[2]

record: dict[str, list] = {
    "rows": [],
    "optimizer_steps": [],
    "backward_syncs": [],
    "saved": [],
    "metrics_lines": [],
    "rng_end": [],
}

rank_rows, save_outputs, append_metrics = loop.rank_rows, stage.save_outputs, rundir.append_metrics
make_accelerator, make_optimizer = stage.make_accelerator, stage.make_optimizer
save_checkpoint, backward = loop.save_checkpoint, Accelerator.backward
load_checkpoint = loop.load_checkpoint


def record_rows(order, micro_batch, cfg, rank, world):
    rows = rank_rows(order, micro_batch, cfg, rank, world)
    record["rows"].extend(rows)
    for _ in range(rank + 1):  # each process moves its Python RNG on its own way
        random.random()
    return rows


def record_save(run, state_dict, directory):
    record["saved"].append(str(run.out))
    return save_outputs(run, state_dict, directory)


def record_metrics(path, line):
    record["metrics_lines"].append(str(path))
    return append_metrics(path, line)


loading = [False]  # restoring a checkpoint: torch's sharded optimizer load steps once, at lr 0


def record_loading(*args, **kwargs):
    loading[0] = True
    try:
        return load_checkpoint(*args, **kwargs)
    finally:
        loading[0] = False


def counting_optimizer(model, cfg, steps):
    """The torch optimizer, its `step` counted: one count is one parameter update."""
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    step = optimizer.step

    def counted(*args, **kwargs):
        record["optimizer_steps"][-1] += 0 if loading[0] else 1
        return step(*args, **kwargs)

    optimizer.step = counted
    return optimizer, scheduler


def recording_backward(self, loss, **kwargs):
    record["backward_syncs"][-1].append(bool(self.sync_gradients))
    return backward(self, loss, **kwargs)


def fsdp2_accelerator(cfg, device):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = make_accelerator(cfg, device)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        state_dict_type="SHARDED_STATE_DICT",
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
    )
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    return acc


class Killed(Exception):
    pass


def killed_after_first_save(*args, **kwargs):
    path = save_checkpoint(*args, **kwargs)
    raise Killed(str(path))


loop.rank_rows = record_rows
loop.load_checkpoint = record_loading
stage.save_outputs = record_save
rundir.append_metrics = record_metrics
stage.make_optimizer = counting_optimizer
Accelerator.backward = recording_backward
if backend == "fsdp2":
    stage.make_accelerator = fsdp2_accelerator


def run(recipe, directory: str, resume: str = "no") -> None:
    record["optimizer_steps"].append(0)
    record["backward_syncs"].append([])
    cfg = replace(recipe.train, output_dir=directory, resume=resume)
    random.seed(0)
    try:
        train(replace(recipe, train=cfg))
    finally:  # where each process's RNG ended: a resumed run must end where the whole one did
        state = repr(random.getstate()).encode()
        record["rng_end"].append(hashlib.sha256(state).hexdigest())


from accelerate import PartialState  # noqa: E402

for job in json.loads((report / "jobs.json").read_text()):
    for value in record.values():
        value.clear()
    os.environ["ALIGNKIT_CACHE"] = job["cache"]
    train = TRAIN[job["stage"]]
    recipe = load_recipe(None, parse_overrides(job["overrides"]))
    out = Path(recipe.train.output_dir)
    run(recipe, str(out / "full"))
    loop.save_checkpoint = killed_after_first_save
    try:
        run(recipe, str(out / "cut"))
        raise AssertionError("the run was not killed")
    except Killed:
        pass
    loop.save_checkpoint = save_checkpoint
    run(recipe, str(out / "cut"), resume="auto")

    state = PartialState()
    done = {
        **record,
        "world": state.num_processes,
        "distributed_type": str(Accelerator().distributed_type),
    }
    (report / f"{job['name']}-rank{state.process_index}.json").write_text(json.dumps(done))

"""Checkpoints restore exactly and never run code they carry."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from alignkit import rundir
from alignkit.errors import AlignkitError
from alignkit.train.checkpoint import (
    TrainState,
    check_loadable,
    load_checkpoint,
    save_checkpoint,
)


class Planted:
    """What an attacker pickles: loading it calls `touch` on a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def small_run(seed: int = 0) -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer, object]:
    """A prepared model (a trained layer and a frozen one), optimizer and schedule, one step on."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    acc = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return acc, model, optimizer, scheduler


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_resume_restores_weights_optimizer_schedule_and_every_rng(tmp_path):
    acc, model, optimizer, scheduler = small_run()
    state = TrainState(step=3, epoch=1, micro_batch=2, trained_tokens=99)
    path = save_checkpoint(acc, tmp_path, state, keep=2)
    expected = draws()
    fresh_acc, fresh, fresh_optimizer, fresh_scheduler = small_run(seed=1)
    draws()  # move every generator on
    restored = load_checkpoint(fresh_acc, fresh, path)
    assert restored == state
    assert torch.equal(fresh[0].weight, model[0].weight)  # trained: restored
    assert not torch.equal(fresh[1].weight, model[1].weight)  # frozen: from its own start
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert torch.equal(
        fresh_optimizer.state_dict()["state"][0]["exp_avg"],
        optimizer.state_dict()["state"][0]["exp_avg"],
    )
    assert draws() == expected
    names = sorted(p.name for p in path.iterdir())
    assert rundir.CHECKPOINT_STATE in names and "rng-0.json" in names
    assert "rng-0.safetensors" in names and rundir.ACCELERATE_WEIGHTS in names
    assert not any(n.endswith(".pkl") for n in names)  # Accelerate's RNG pickle is replaced


def test_the_checkpoint_holds_the_trained_weights_only(tmp_path):
    from safetensors import safe_open

    acc, *_ = small_run()
    path = save_checkpoint(acc, tmp_path, TrainState(step=1), keep=2)
    with safe_open(path / rundir.ACCELERATE_WEIGHTS, "pt") as handle:
        assert sorted(handle.keys()) == ["0.bias", "0.weight"]  # layer 1 is frozen


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    acc, *_ = small_run()
    path = save_checkpoint(acc, tmp_path, TrainState(step=1), keep=2)
    marker = tmp_path / "pwned"
    torch.save({"state": Planted(str(marker))}, path / "optimizer.bin")
    with pytest.raises(AlignkitError, match="holds more than tensors and plain values"):
        load_checkpoint(*small_run()[:2], path)
    assert not marker.exists()


def test_a_planted_accelerate_rng_pickle_is_refused(tmp_path):
    """Accelerate's own load_state would unpickle random_states_0.pkl: alignkit refuses first."""
    acc, *_ = small_run()
    path = save_checkpoint(acc, tmp_path, TrainState(step=1), keep=2)
    marker = tmp_path / "pwned"
    torch.save({"random_state": Planted(str(marker))}, rundir.accelerate_rng_file(path, 0))
    with pytest.raises(AlignkitError, match="random_states_0.pkl"):
        load_checkpoint(*small_run()[:2], path)
    assert not marker.exists()


def test_a_sharded_checkpoint_is_checked_before_torch_reads_it(tmp_path):
    """A torch.distributed.checkpoint dir (FSDP): its pickled index and every non-tensor
    item are read without running code; a plain one passes."""
    import pickle

    import torch.distributed.checkpoint as dcp

    plain = tmp_path / "plain" / "pytorch_model_fsdp_0"
    dcp.save({"w": torch.ones(2), "group": {"lr": 0.1, "betas": (0.9, 0.99)}}, checkpoint_id=plain)
    check_loadable(plain.parent)

    marker = tmp_path / "pwned"
    item = tmp_path / "item" / "optimizer_0"
    dcp.save({"w": torch.ones(2), "group": Planted(str(marker))}, checkpoint_id=item)
    with pytest.raises(AlignkitError, match="holds more than tensors"):
        check_loadable(item.parent)

    index = tmp_path / "index" / "pytorch_model_fsdp_0"
    index.mkdir(parents=True)
    (index / ".metadata").write_bytes(pickle.dumps(Planted(str(marker))))
    with pytest.raises(AlignkitError, match="is not a plain shard index"):
        check_loadable(index.parent)
    assert not marker.exists()


def test_a_checkpoint_without_rng_files_is_a_named_error(tmp_path):
    acc, *_ = small_run()
    path = save_checkpoint(acc, tmp_path, TrainState(step=1), keep=2)
    (path / "rng-0.json").unlink()
    with pytest.raises(AlignkitError, match="lacks rng-0.json"):
        load_checkpoint(*small_run()[:2], path)


def test_another_process_count_is_refused(tmp_path):
    acc, *_ = small_run()
    path = save_checkpoint(acc, tmp_path, TrainState(step=1, processes=2), keep=2)
    with pytest.raises(AlignkitError, match="written by 2 process"):
        load_checkpoint(*small_run()[:2], path)


def test_a_killed_save_leaves_nothing_behind_the_next_save_and_is_never_listed(tmp_path):
    acc, *_ = small_run()
    stale = tmp_path / ".tmp-checkpoint-2.abcd1234"  # killed while writing checkpoint-2
    stale.mkdir()
    (stale / rundir.CHECKPOINT_STATE).write_text("{}")
    assert rundir.checkpoints(tmp_path) == []
    save_checkpoint(acc, tmp_path, TrainState(step=4), keep=2)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]


def test_only_the_last_checkpoints_are_kept(tmp_path):
    acc, *_ = small_run()
    for step in (1, 2, 3):
        save_checkpoint(acc, tmp_path, TrainState(step=step), keep=2)
    assert [p.name for p in rundir.checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]

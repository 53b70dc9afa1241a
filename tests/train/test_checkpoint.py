"""Checkpoints restore exactly and never run code they carry."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from alignkit import rundir
from alignkit.errors import AlignkitError
from alignkit.train.checkpoint import TrainState, load_checkpoint, save_checkpoint


class Planted:
    """What an attacker pickles: loading it calls `touch` on a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def small_run() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_resume_restores_weights_optimizer_schedule_and_every_rng(tmp_path):
    model, optimizer, scheduler = small_run()
    state = TrainState(step=3, epoch=1, micro_batch=2, trained_tokens=99)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, state, keep=2)
    expected = draws()
    fresh, fresh_optimizer, fresh_scheduler = small_run()
    with torch.no_grad():
        fresh.weight.zero_()
    draws()  # move every generator on
    restored = load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler)
    assert restored == state
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert draws() == expected
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [
            rundir.CHECKPOINT_WEIGHTS,
            rundir.CHECKPOINT_OPTIMIZER,
            rundir.CHECKPOINT_RNG_STATE,
            rundir.CHECKPOINT_RNG_TENSORS,
            rundir.CHECKPOINT_STATE,
        ]
    )


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    model, optimizer, scheduler = small_run()
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=1), keep=2)
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Planted(str(marker))}, path / rundir.CHECKPOINT_OPTIMIZER)
    with pytest.raises(AlignkitError, match="holds more than tensors and plain values"):
        load_checkpoint(path, *small_run())
    assert not marker.exists()


def test_a_checkpoint_without_rng_files_is_a_named_error(tmp_path):
    model, optimizer, scheduler = small_run()
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=1), keep=2)
    (path / rundir.CHECKPOINT_RNG_STATE).unlink()
    with pytest.raises(AlignkitError, match="lacks rng.json"):
        load_checkpoint(path, *small_run())


def test_a_killed_save_leaves_nothing_behind_the_next_save_and_is_never_listed(tmp_path):
    model, optimizer, scheduler = small_run()
    stale = tmp_path / ".tmp-checkpoint-2.abcd1234"  # killed while writing checkpoint-2
    stale.mkdir()
    (stale / rundir.CHECKPOINT_STATE).write_text("{}")
    assert rundir.checkpoints(tmp_path) == []
    save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=4), keep=2)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]

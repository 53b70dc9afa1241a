"""Accumulation through Accelerate: the contract DeepSpeed's engine relies on.

Under DeepSpeed, Accelerate's `backward` hands the loss to the engine, which divides
it by its accumulation count and steps (clip, update, zero) on every backward made
while `sync_gradients` is set; the optimizer's own `step` does nothing. DeepSpeed does
not run on this CPU-only machine (README, "Several GPUs and nodes"), so an engine
stand-in with exactly that behaviour drives the real loop and a real Accelerator here:
it must update once per logged step, with the gradient of the step's summed loss over
its global unit count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import alignkit.train.loop as loop
from alignkit.config import TrainConfig
from alignkit.errors import AlignkitError
from alignkit.train.loop import LoopParts, run_loop


@dataclass
class Rows:
    """A micro-batch of (x, y) rows; each row is one unit."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def units(self) -> int:
        return len(self.y)

    trained_tokens = units
    input_tokens = units

    def to(self, device):
        return self


def make_batch(rows):
    return Rows(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))


def loss_sums(model, batch):
    losses = (model(batch.x).squeeze(-1) - batch.y) ** 2
    return losses.sum(), torch.tensor(batch.units), {}


class Inert:
    """DeepSpeed's optimizer wrapper under Accelerate: stepping is the engine's job."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


def engine_run(tmp_path: Path, accumulation: int, monkeypatch) -> tuple[list, list, int]:
    """Train 5 micro-batches of 2 rows per epoch for 2 epochs through the stand-in
    engine; the gradients it stepped with, the ones expected, and the logged steps."""
    torch.manual_seed(0)
    rows = [(torch.randn(3), torch.randn(())) for _ in range(10)]
    model = torch.nn.Linear(3, 1)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cfg = TrainConfig(
        micro_batch_size=2,
        gradient_accumulation_steps=accumulation,
        epochs=2,
        max_grad_norm=0,
        output_dir=str(tmp_path),
    )
    stepped: list[torch.Tensor] = []
    expected: list[torch.Tensor] = []

    def engine_backward(loss, **kwargs):
        (loss / acc.gradient_accumulation_steps).backward()  # the engine's own scaling
        if acc.sync_gradients:  # a boundary: the engine steps
            stepped.append(model.weight.grad.clone())
            optimizer.step()
            optimizer.zero_grad()

    monkeypatch.setattr(acc, "backward", engine_backward)
    monkeypatch.setattr(loop, "save_checkpoint", lambda *args, **kwargs: None)
    original_step_sums = loop._step_sums

    def expect(parts, batches):
        """The gradient of sum / count over the step's rows, from the weights it starts at."""
        probe = torch.nn.Linear(3, 1)
        probe.load_state_dict(model.state_dict())
        total = sum(loss_sums(probe, b)[0] for b in batches)
        total = total / sum(b.units for b in batches)
        expected.append(torch.autograd.grad(total, probe.weight)[0])
        return original_step_sums(parts, batches)

    monkeypatch.setattr(loop, "_step_sums", expect)
    parts = LoopParts(
        accelerator=acc,
        model=model,
        optimizer=Inert(optimizer),
        scheduler=scheduler,
        rows=rows,
        make_batch=make_batch,
        loss_sums=loss_sums,
        eval_rows=[],
        make_eval_batch=make_batch,
        cfg=cfg,
        output_dir=tmp_path,
    )
    state = run_loop(parts)
    return stepped, expected, state.step


@pytest.mark.parametrize("accumulation", [1, 2, 3])
def test_a_deepspeed_style_engine_steps_once_per_logged_step_with_the_exact_gradient(
    tmp_path, monkeypatch, accumulation
):
    stepped, expected, steps = engine_run(tmp_path, accumulation, monkeypatch)
    # 5 micro-batches per epoch: steps of `accumulation` micro-batches, the tail shorter
    assert steps == 2 * -(-5 // accumulation)
    assert len(stepped) == steps  # one engine update per logged step, never more
    for got, want in zip(stepped, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_mismatched_accelerator_is_refused(tmp_path):
    acc = Accelerator(cpu=True, gradient_accumulation_steps=1)
    parts = LoopParts(
        accelerator=acc,
        model=torch.nn.Linear(3, 1),
        optimizer=None,
        scheduler=None,
        rows=[],
        make_batch=make_batch,
        loss_sums=loss_sums,
        eval_rows=[],
        make_eval_batch=make_batch,
        cfg=TrainConfig(gradient_accumulation_steps=4),
        output_dir=tmp_path,
    )
    with pytest.raises(AlignkitError, match="accumulates 1 micro-batches per step"):
        run_loop(parts)

"""The training loop's pieces that involve every process: here, eval across ranks."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from alignkit.config import TrainConfig
from alignkit.train.loop import LoopParts, evaluate


class Rank:
    """One process of a simulated group: records what it all-reduces, sums nothing."""

    def __init__(self, index: int, world: int):
        self.process_index, self.num_processes = index, world
        self.device = torch.device("cpu")
        self.reduced: list[torch.Tensor] = []

    def autocast(self):
        return nullcontext()

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        self.reduced.append(tensor.clone())
        return tensor


class Rows(list):
    def to(self, device):
        return self


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.forwards = 0


def loss_sums(model, batch):
    """A loss per row (its value) and a metric per row (its square), as a stage returns them."""
    model.forwards += 1
    values = torch.tensor(batch, dtype=torch.float32)
    return values.sum(), torch.tensor(len(batch)), {"square": (values**2).sum()}


def evaluate_on(rank: Rank, rows: list[float], micro_batch: int) -> tuple[dict, Model]:
    model = Model()
    parts = LoopParts(
        accelerator=rank,
        model=model,
        optimizer=None,
        scheduler=None,
        rows=[],
        make_batch=Rows,
        loss_sums=loss_sums,
        eval_rows=rows,
        make_eval_batch=Rows,
        cfg=TrainConfig(micro_batch_size=micro_batch),
        output_dir=Path("unused"),
    )
    return evaluate(parts), model


@pytest.mark.parametrize(("rows", "micro_batch"), [([3.0], 2), ([1.0, 2.0, 3.0], 1)])
def test_every_rank_reduces_the_same_keys_and_runs_the_same_forwards(rows, micro_batch):
    ranks = [Rank(0, 2), Rank(1, 2)]
    models = [evaluate_on(rank, rows, micro_batch)[1] for rank in ranks]
    shapes = [[t.shape for t in rank.reduced] for rank in ranks]
    assert shapes[0] == shapes[1]  # an all-reduce of mismatched sizes fails or hangs
    assert models[0].forwards == models[1].forwards  # FSDP / ZeRO-3 gather in each forward
    # the two ranks' contributions add up to the whole eval set: sum, squares, and count
    totals = [sum(rank.reduced[i] for rank in ranks) for i in range(2)]
    assert totals[0].item() == len(rows)
    assert totals[1].tolist() == [sum(rows), sum(r * r for r in rows)]

"""Checkpoints: trainable weights, optimizer and schedule, RNG states and loop position.

A checkpoint holds nothing that runs code when loaded: weights and RNG tensors are
safetensors, positions and Python/NumPy RNG states are JSON, and the optimizer and
schedule state (tensors and plain values) is read with `torch.load(weights_only=True)`.
A checkpoint whose optimizer file holds anything else is refused, since `--resume` (and
`alignkit run`, by itself) loads whatever run dir it is pointed at.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit import rundir
from alignkit.errors import AlignkitError


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    trained_tokens: int = 0
    train_seconds: float = 0.0  # summed over resumed invocations


def rng_values() -> dict[str, Any]:
    """Python's and NumPy's generator states as JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
    }


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return tensors


def set_rng(values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad
    }


def save_checkpoint(
    directory: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainState, keep: int
) -> Path:
    """Write checkpoint-{step} atomically (temporary dir, then rename); keep the last `keep`."""
    final = rundir.checkpoint_dir(directory, state.step)
    # what a save killed mid-way left, whatever its step
    rundir.remove_temporaries(directory, f"{rundir.CHECKPOINT_PREFIX}*")
    with rundir.atomic_dir(final) as tmp:
        save_file(trainable_state(model), tmp / rundir.CHECKPOINT_WEIGHTS)
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            tmp / rundir.CHECKPOINT_OPTIMIZER,
        )
        save_file(rng_tensors(), tmp / rundir.CHECKPOINT_RNG_TENSORS)
        (tmp / rundir.CHECKPOINT_RNG_STATE).write_text(json.dumps(rng_values()))
        (tmp / rundir.CHECKPOINT_STATE).write_text(json.dumps(asdict(state)))
    for old in rundir.checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_tensors_only(path: Path) -> Any:
    """`torch.load` of tensors and plain values; anything else is refused, never run."""
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise AlignkitError(
            f"Checkpoint file '{path}' holds more than tensors and plain values, so it was "
            "not loaded (loading it could run code it carries). If you did not write it, "
            f"delete its checkpoint dir '{path.parent}' and resume from another, or train "
            f"without --resume. Details: {str(exc).splitlines()[0]}"
        ) from None


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> TrainState:
    missing = [
        name
        for name in (rundir.CHECKPOINT_RNG_STATE, rundir.CHECKPOINT_RNG_TENSORS)
        if not (path / name).is_file()
    ]
    if missing:
        raise AlignkitError(
            f"Checkpoint '{path}' lacks {', '.join(missing)} (written by an older alignkit, or "
            "incomplete); it cannot be resumed exactly. Delete it, or train without --resume."
        )
    states = load_tensors_only(path / rundir.CHECKPOINT_OPTIMIZER)
    weights = load_file(path / rundir.CHECKPOINT_WEIGHTS)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    rng = rundir.read_json(path / rundir.CHECKPOINT_RNG_STATE)
    set_rng(rng, load_file(path / rundir.CHECKPOINT_RNG_TENSORS))
    return TrainState(**rundir.read_json(path / rundir.CHECKPOINT_STATE))

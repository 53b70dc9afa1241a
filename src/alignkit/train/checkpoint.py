"""Checkpoints: Accelerate's state (sharded under FSDP and DeepSpeed), each process's RNG
states and the loop position.

`accelerator.save_state` writes the weights, optimizer and schedule: under DDP (or one
process) the trainable weights as safetensors and the optimizer and schedule as tensor
files; under FSDP a sharded `torch.distributed.checkpoint` dir; under DeepSpeed its
engine's files. Every process writes into one temporary dir, which the main process
renames into place once all have finished, so a killed save leaves no checkpoint
behind. Each process adds its own RNG states (safetensors and JSON); the main process
adds the loop position (`state.json`), the file that marks a checkpoint complete.

A checkpoint holds nothing that runs code when loaded, and nothing is loaded that
could: before `accelerator.load_state` reads a checkpoint, every file it would unpickle
is read with a loader that builds tensors and plain values only (`torch.load`'s
weights-only mode, or for a sharded checkpoint's index, an unpickler that knows only
its record types); a file holding anything else is refused, since `--resume` (and
`alignkit run`, by itself) loads whatever run dir it is pointed at.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
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
    processes: int = 1  # the data position counts global micro-batches of this many


# ---------------------------------------------------------------- RNG states


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


def save_rng(directory: Path, rank: int) -> None:
    state, tensors = rundir.checkpoint_rng_files(directory, rank)
    save_file(rng_tensors(), tensors)
    state.write_text(json.dumps(rng_values()))


# ---------------------------------------------------------------- saving


def distributed_kind(acc: Any) -> str:
    """Accelerate's distributed type by name: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED..."""
    return str(acc.distributed_type).rsplit(".", 1)[-1]


def is_sharded(acc: Any) -> bool:
    """Whether Accelerate saves the weights itself in shards (FSDP, DeepSpeed)."""
    return distributed_kind(acc) in ("FSDP", "DEEPSPEED")


def keep_trainable(models: list[Any], weights: list[dict[str, Any]], _directory: str) -> None:
    """`save_state` hook (DDP / one process): keep only the trainable weights of each
    model's state dict; a LoRA checkpoint then holds the adapter, not the base model."""
    for model, state_dict in zip(models, weights, strict=True):
        trainable = trainable_names(model)
        for name in [n for n in state_dict if unwrapped_name(n) not in trainable]:
            del state_dict[name]


def unwrapped_name(name: str) -> str:
    """A parameter's name without DDP's wrapper prefix."""
    return name.removeprefix("module.")


def trainable_names(model: Any) -> set[str]:
    return {unwrapped_name(n) for n, p in model.named_parameters() if p.requires_grad}


def share_path(acc: Any, path: Path | None) -> Path:
    """The main process's `path`, on every process."""
    from accelerate.utils import broadcast_object_list

    holder = [str(path) if path is not None else None]
    broadcast_object_list(holder, from_process=0)
    return Path(holder[0])


@contextmanager
def staged_on_every_process(acc: Any, final: Path) -> Iterator[Path]:
    """A temporary dir beside `final` that every process writes into; after a barrier the
    main process renames it to `final` (what an earlier, killed save left is cleared)."""
    if not acc.is_main_process:
        yield share_path(acc, None)
        acc.wait_for_everyone()
        return
    rundir.remove_temporaries(final.parent, f"{rundir.CHECKPOINT_PREFIX}*")
    with rundir.atomic_dir(final) as tmp:
        yield share_path(acc, tmp)
        acc.wait_for_everyone()


def save_checkpoint(acc: Any, directory: Path, state: TrainState, keep: int) -> Path:
    """Write checkpoint-{step} from every process (atomically); keep the last `keep`."""
    final = rundir.checkpoint_dir(directory, state.step)
    handle = None if is_sharded(acc) else acc.register_save_state_pre_hook(keep_trainable)
    try:
        with staged_on_every_process(acc, final) as tmp:
            acc.save_state(str(tmp), safe_serialization=True)
            # Accelerate's own RNG file is a pickle: each process keeps its RNG as
            # safetensors and JSON instead
            rundir.accelerate_rng_file(tmp, acc.process_index).unlink(missing_ok=True)
            save_rng(tmp, acc.process_index)
            acc.wait_for_everyone()  # every process has written before state.json marks it whole
            if acc.is_main_process:
                rundir.write_json(tmp / rundir.CHECKPOINT_STATE, asdict(state))
    finally:
        if handle is not None:
            handle.remove()
    if acc.is_main_process:
        for old in rundir.checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


# ---------------------------------------------------------------- safe loading


def refused(path: Path, why: str) -> AlignkitError:
    return AlignkitError(
        f"Checkpoint file '{path}' {why}, so it was not loaded (loading it could run code it "
        f"carries). If you did not write it, delete its checkpoint dir '{path.parent}' and "
        "resume from another, or train without --resume."
    )


def load_tensors_only(path: Path | io.BytesIO, name: Path | None = None) -> Any:
    """`torch.load` of tensors and plain values; anything else is refused, never run."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        where = name if name is not None else Path(str(path))
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise refused(
            where, f"holds more than tensors and plain values (details: {detail})"
        ) from None


# the record types a torch.distributed.checkpoint index (`.metadata`) is made of
SHARD_INDEX_TYPES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class ShardIndexUnpickler(pickle.Unpickler):
    """Unpickles a sharded checkpoint's index: its record types and torch dtypes, no
    other global (so no function it names can run)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SHARD_INDEX_TYPES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def check_shard_dir(index: Path) -> None:
    """A `torch.distributed.checkpoint` dir: its index holds only record types, and each
    non-tensor item (which the reader unpickles in full) holds only plain values."""
    try:
        with index.open("rb") as handle:
            metadata = ShardIndexUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise refused(index, f"is not a plain shard index ({exc})") from None
    storage = getattr(metadata, "storage_data", None) or {}
    for key, meta in getattr(metadata, "state_dict_metadata", {}).items():
        if type(meta).__name__ != "BytesStorageMetadata":
            continue
        info = storage.get(_bytes_index(key))
        if info is None or getattr(info, "transform_descriptors", None):
            raise refused(index, f"describes item '{key}' in a way alignkit does not read")
        shard = index.parent / Path(info.relative_path).name
        with shard.open("rb") as handle:
            handle.seek(info.offset)
            blob = io.BytesIO(handle.read(info.length))
        load_tensors_only(blob, name=shard)


def _bytes_index(key: str) -> Any:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return MetadataIndex(fqn=key)


SAFE_SUFFIXES = (".safetensors", ".json", ".distcp")  # no code; .distcp tensors: weights-only


def check_loadable(path: Path) -> None:
    """Refuse a checkpoint holding any file that Accelerate, torch or DeepSpeed would
    unpickle with more than tensors and plain values in it."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.name == ".metadata":
            check_shard_dir(file)
        elif file.suffix in (".bin", ".pt", ".pth", ".pkl"):
            load_tensors_only(file)
        elif file.suffix not in SAFE_SUFFIXES and file.name not in rundir.CHECKPOINT_TEXT_FILES:
            raise refused(file, "is not a file an alignkit checkpoint holds")


def check_weights_match(model: Any, path: Path) -> None:
    """DDP / one process: the checkpoint's weights are this (prepared) model's trainable ones."""
    file = path / rundir.ACCELERATE_WEIGHTS
    if not file.is_file():
        raise AlignkitError(
            f"Checkpoint '{path}' has no {file.name} (written by an older alignkit, or by "
            "another distributed setup). Resume with the launch setup that wrote it, or "
            "train without --resume."
        )
    with safe_open(file, "pt") as handle:
        saved = {unwrapped_name(n) for n in handle.keys()}  # noqa: SIM118 (not a dict)
    trainable = trainable_names(model)
    if not saved or saved - trainable:
        extra = sorted(saved - trainable)[:3]
        raise AlignkitError(
            f"Checkpoint '{path}' holds weights this run does not train ({', '.join(extra)}"
            f"{', ...' if len(saved - trainable) > 3 else ''}): it was written for another "
            "model, adapter or setup. Resume with the recipe that wrote it, or train "
            "without --resume."
        )


def load_checkpoint(acc: Any, model: Any, path: Path) -> TrainState:
    """Restore model (as prepared), optimizer, schedule, this process's RNG and the loop
    position, from a checkpoint written by as many processes."""
    state = TrainState(**rundir.read_json(path / rundir.CHECKPOINT_STATE))
    if state.processes != acc.num_processes:
        raise AlignkitError(
            f"Checkpoint '{path}' was written by {state.processes} process(es); this run has "
            f"{acc.num_processes}. Resume with {state.processes} (its data position and "
            "sharded state are per process), or train without --resume."
        )
    rng_state, rng_tensor_file = rundir.checkpoint_rng_files(path, acc.process_index)
    missing = [p.name for p in (rng_state, rng_tensor_file) if not p.is_file()]
    if missing:
        raise AlignkitError(
            f"Checkpoint '{path}' lacks {', '.join(missing)} (written by an older alignkit, "
            "or incomplete); it cannot be resumed exactly. Delete it, or train without "
            "--resume."
        )
    check_loadable(path)
    if is_sharded(acc):
        acc.load_state(str(path))
    else:
        check_weights_match(model, path)
        acc.load_state(str(path), strict=False)  # the file holds the trainable weights only
    set_rng(rundir.read_json(rng_state), load_file(rng_tensor_file))
    return state

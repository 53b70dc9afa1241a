"""Attention that stays inside each sequence of a flattened, padding-free row.

A padding-free batch is one row holding every sequence of the micro-batch back to back.
Each `Block` is a span of that row whose tokens attend only to tokens of the same span:
causally, or as two branches on a shared part (a prompt with its chosen and rejected
completions). Attention runs span by span, so its cost is the sum of the spans' squared
lengths, not the squared length of the whole row, and no [T, T] mask is ever built.

It is plugged into transformers' attention registry under `BLOCKS`; batches without
blocks still get plain SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignkit.data.batching import Block
from alignkit.errors import AlignkitError

BLOCKS = "alignkit_blocks"


def block_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    alignkit_blocks: list[Block] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA over each block of a one-row batch; output [1, T, heads, head_dim].

    Without blocks (an ordinary padded batch) this is the usual SDPA with the model's mask.
    """
    if alignkit_blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1:
        raise AlignkitError("block attention needs the batch flattened into one row.")
    window = kwargs.get("sliding_window") or None
    outputs = [
        out
        for b in alignkit_blocks
        for out in block_outputs(module, query, key, value, b, window, kwargs)
    ]
    return torch.cat(outputs, dim=1), None


def block_outputs(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    b: Block,
    window: int | None,
    kwargs: dict[str, Any],
) -> list[torch.Tensor]:
    """Attention outputs of one block, in row order.

    A two-branch block takes a causal call for [shared | first] and a masked call of the
    second branch against [shared | second], instead of one masked call over the whole
    block: with a mask SDPA computes every query-key product, with the causal flag half.
    A sliding `window` shorter than a call's keys adds its band to the mask.
    """

    def gather(t: torch.Tensor, spans: list[slice]) -> torch.Tensor:
        return t[:, :, spans[0]] if len(spans) == 1 else torch.cat([t[:, :, s] for s in spans], 2)

    def attend(q: slice, kv: list[slice], mask: torch.Tensor | None) -> torch.Tensor:
        mask = None if mask is None else mask[None, None]
        return sdpa_attention_forward(
            module, query[:, :, q], gather(key, kv), gather(value, kv), mask, **kwargs
        )[0]

    if b.second is None:
        n = b.end - b.start
        return [attend(slice(b.start, b.end), [slice(b.start, b.end)], causal_window(n, window))]
    head, tail = slice(b.start, b.second), slice(b.second, b.end)
    shared = slice(b.start, b.start + b.shared)
    mask = b.tail_mask
    if window is not None and b.end - b.second + b.shared > window:
        mask = mask & branch_window(b.shared, b.end - b.second, window).to(mask.device)
    return [
        attend(head, [head], causal_window(b.second - b.start, window)),
        attend(tail, [shared, tail], mask),
    ]


def in_window(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[q, k] bool: key positions within `window` of each query position, earlier or equal
    (transformers' sliding window: kv > q - window)."""
    return (k_pos[None, :] > q_pos[:, None] - window) & (k_pos[None, :] <= q_pos[:, None])


def causal_window(n: int, window: int | None) -> torch.Tensor | None:
    """The mask of a causal call over `n` tokens: None (the causal flag) unless a sliding
    window shorter than `n` cuts it."""
    if window is None or n <= window:
        return None
    positions = torch.arange(n)
    return in_window(positions, positions, window)


def branch_window(shared: int, second: int, window: int) -> torch.Tensor:
    """[second, shared + second] window band of a second branch whose positions continue
    from the shared part's end, against [shared | second] keys."""
    queries = torch.arange(shared, shared + second)
    return in_window(queries, torch.cat([torch.arange(shared), queries]), window)


AttentionInterface.register(BLOCKS, block_attention_forward)
AttentionMaskInterface.register(BLOCKS, sdpa_mask)  # masks for batches without blocks

# A 4D mask is passed through by transformers untouched: this placeholder stops it from
# building a [T, T] mask for a padding-free row, whose blocks say everything.
UNMASKED = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def use_block_attention(model: Any) -> None:
    """Route the model's attention through `block_attention_forward` from now on.

    Permanent rather than per forward: gradient checkpointing re-runs layers during
    backward and must take the same path. The setting is not saved with the model.
    """
    model.config._attn_implementation = BLOCKS


# Model types whose padding-free rows give the padded rows' log-probs and gradients, proved
# on tiny random models in tests/train/test_families.py (any other type keeps padded rows).
VERIFIED_FAMILIES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma3_text",
        "phi",
        "phi3",
        "olmo2",
        "granite",
        "cohere",
        "starcoder2",
        "gpt_neox",
        "gpt2",
        "deepseek_v3",
    }
)
ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


def unwrap(model: Any) -> Any:
    """The model under DDP-style wrappers (PEFT models are kept: they forward attributes)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def base_model(model: Any) -> Any:
    """The transformers model under DDP-style and PEFT wrappers."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def padding_free_problem(model: Any) -> str | None:
    """Why block attention would not reproduce this model's own attention, or None."""
    inner = base_model(model)
    config = inner.config
    others = sorted(set(getattr(config, "layer_types", None) or []) - ATTENTION_LAYERS)
    if others:
        return f"its {', '.join(others)} layers carry state from one sequence into the next"
    if not getattr(inner, "_supports_attention_backend", False):
        return "its attention does not go through transformers' attention interface"
    if getattr(config, "attn_logit_softcapping", None):
        return "it soft-caps attention logits, which SDPA cannot"
    if any(name.endswith("sinks") for name, _ in inner.named_parameters()):
        return "its attention sinks have no SDPA equivalent"
    if config._attn_implementation not in ("sdpa", BLOCKS):
        return f"it runs '{config._attn_implementation}' attention, not SDPA"
    if config.model_type not in VERIFIED_FAMILIES:
        return f"the padding-free path is not verified for '{config.model_type}' models"
    return None

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
    window = kwargs.get("sliding_window")
    if window and max(b.end - b.start for b in alignkit_blocks) > window:
        raise AlignkitError(
            f"A sequence is longer than the model's sliding window ({window}); set "
            "train.padding_free=false for this model."
        )
    outputs = [
        out for b in alignkit_blocks for out in block_outputs(module, query, key, value, b, kwargs)
    ]
    return torch.cat(outputs, dim=1), None


def block_outputs(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    b: Block,
    kwargs: dict[str, Any],
) -> list[torch.Tensor]:
    """Attention outputs of one block, in row order.

    A two-branch block takes a causal call for [shared | first] and a masked call of the
    second branch against [shared | second], instead of one masked call over the whole
    block: with a mask SDPA computes every query-key product, with the causal flag half.
    """

    def gather(t: torch.Tensor, spans: list[slice]) -> torch.Tensor:
        return t[:, :, spans[0]] if len(spans) == 1 else torch.cat([t[:, :, s] for s in spans], 2)

    def attend(q: slice, kv: list[slice], mask: torch.Tensor | None) -> torch.Tensor:
        mask = None if mask is None else mask[None, None]
        return sdpa_attention_forward(
            module, query[:, :, q], gather(key, kv), gather(value, kv), mask, **kwargs
        )[0]

    if b.second is None:
        return [attend(slice(b.start, b.end), [slice(b.start, b.end)], None)]
    head, tail = slice(b.start, b.second), slice(b.second, b.end)
    shared = slice(b.start, b.start + b.shared)
    return [attend(head, [head], None), attend(tail, [shared, tail], b.tail_mask)]


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

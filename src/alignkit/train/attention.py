"""Attention that stays inside each sequence of a flattened, padding-free row.

A padding-free batch is one row holding every sequence of the micro-batch back to back.
Each `Block` is a span of that row whose tokens attend only to tokens of the same span:
plainly causal (`mask` None), or along a `mask` such as a shared prompt with two
branches. Attention runs span by span, so its cost is the sum of the spans' squared
lengths, not the squared length of the whole row, and no [T, T] mask is ever built.

It is plugged into transformers' attention registry under `BLOCKS`; the model keeps its
own implementation except inside `blocks_attention(model)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

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
    """SDPA over each block of a one-row batch; output [1, T, heads, head_dim]."""
    if alignkit_blocks is None or query.shape[0] != 1:
        raise AlignkitError("block attention needs one flattened row and its blocks.")
    window = kwargs.get("sliding_window")
    if window and max(b.end - b.start for b in alignkit_blocks) > window:
        raise AlignkitError(
            f"A sequence is longer than the model's sliding window ({window}); set "
            "train.padding_free=false for this model."
        )
    outputs = [
        sdpa_attention_forward(
            module,
            query[:, :, b.start : b.end],
            key[:, :, b.start : b.end],
            value[:, :, b.start : b.end],
            None if b.mask is None else b.mask[None, None],
            **kwargs,
        )[0]
        for b in alignkit_blocks
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(BLOCKS, block_attention_forward)


@contextmanager
def blocks_attention(model: Any) -> Iterator[None]:
    """Route the model's attention through `block_attention_forward` for the duration."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = BLOCKS
    try:
        yield
    finally:
        config._attn_implementation = previous

"""Forward passes that turn a batch into log-probs of its scored label tokens.

Losses never see logits: they get per-token log-probs, or their sums per sequence
slot. Two savings are applied when the model allows them:

- The model is asked for outputs only from the first scored position on
  (`logits_to_keep`), so prompt positions cost no LM-head work.
- With `chunk > 0` the LM head is bypassed: the model returns its final hidden states,
  and `chunked_logps` applies the head to the scored positions only, a chunk of rows
  at a time, so no float32 [batch, seq, vocab] tensor exists in forward or backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from alignkit.data.batching import IGNORE, Batch, SequenceBatch
from alignkit.train.attention import UNMASKED, unwrap, use_block_attention

# config attributes that change logits after the head: those models keep the plain path
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def first_scored(labels: torch.Tensor) -> int:
    """The earliest position holding a scored label (at least 1: position 0 has no predictor)."""
    scored = (labels != IGNORE).any(dim=0).nonzero()
    return max(1, int(scored[0])) if len(scored) else labels.shape[1] - 1


def linear_head(model: Any) -> torch.nn.Linear | None:
    """The model's output layer when it is a plain linear map applied last, else None."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # e.g. a LoRA-wrapped head
        return None
    if any(getattr(inner.config, name, None) for name in LOGIT_TRANSFORMS):
        return None
    return head if whole_local(head.weight, (head.out_features, head.in_features)) else None


def whole_local(weight: torch.Tensor, shape: tuple[int, int]) -> bool:
    """False for a parameter sharded outside its module's forward (FSDP, ZeRO-3), which the
    chunked head cannot read directly."""
    sharded = hasattr(weight, "placements") or hasattr(weight, "ds_id")
    return not sharded and tuple(weight.shape) == shape


@contextmanager
def head_bypassed(model: Any, head: torch.nn.Module) -> Iterator[None]:
    """Swap the output layer for an identity, so the model returns its final hidden states."""
    inner = unwrap(model)
    inner.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        inner.set_output_embeddings(head)


class _ChunkedLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] per row, computed `chunk` rows at a time.

    With a frozen head (LoRA) the gradient with respect to `h` is formed during the
    forward pass (W[t] - softmax @ W, [N, hidden]), so backward is a scaling. With a
    trainable head, backward recomputes each chunk's logits instead of keeping them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, head_grads):  # noqa: ANN001
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        early = ctx.needs_input_grad[0] and not head_grads  # form the hidden gradient now
        grads = torch.empty_like(hidden, dtype=torch.float32) if early else None
        for s in range(0, len(targets), chunk):
            logps = torch.log_softmax(_logits(hidden[s : s + chunk], weight, bias), dim=-1)
            t = targets[s : s + chunk]
            out[s : s + chunk] = logps.gather(1, t[:, None])[:, 0]
            if grads is not None:
                probs = logps.exp_().to(weight.dtype)  # in place: one [chunk, vocab] buffer
                grads[s : s + chunk] = (weight[t] - probs @ weight).float()
        ctx.chunk, ctx.head_grads = chunk, head_grads
        ctx.save_for_backward(hidden, weight, bias, targets, grads)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        hidden, weight, bias, targets, grads = ctx.saved_tensors
        if not ctx.head_grads:
            grad_hidden = None if grads is None else (grad_out[:, None] * grads).to(hidden.dtype)
            return grad_hidden, None, None, None, None, None
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        for s in range(0, len(targets), ctx.chunk):
            h = hidden[s : s + ctx.chunk]
            logits = _logits(h, weight, bias)
            coef = -torch.softmax(logits, dim=-1)  # d log p[t] / d logits = onehot(t) - softmax
            coef[torch.arange(len(h)), targets[s : s + ctx.chunk]] += 1
            coef *= grad_out[s : s + ctx.chunk, None]
            if grad_hidden is not None:
                grad_hidden[s : s + ctx.chunk] = (coef.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_weight += coef.T @ h.float()
            if grad_bias is not None:
                grad_bias += coef.sum(0)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias, None, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(hidden, weight, bias).float()


def chunked_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """[N] float32 log-probs of `targets` [N] under the head (weight [V, H], bias [V]) of `hidden` [N, H]."""
    head_grads = torch.is_grad_enabled() and (
        weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return _ChunkedLogps.apply(hidden, weight, bias, targets, chunk, head_grads)


def token_logps(model: Any, batch: Batch | SequenceBatch, chunk: int) -> torch.Tensor:
    """Log-probs of every scored label, in row-major order of `batch.labels[:, 1:]`."""
    keep = batch.input_ids.shape[1] - first_scored(batch.labels) + 1
    predicted = batch.labels[:, batch.labels.shape[1] - keep + 1 :]
    scored = predicted != IGNORE
    head = linear_head(model) if chunk > 0 else None
    extra = {} if batch.blocks is None else {"alignkit_blocks": batch.blocks}
    if batch.blocks is not None:
        use_block_attention(unwrap(model))
    with head_bypassed(model, head) if head is not None else nullcontext():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask if batch.blocks is None else UNMASKED,
            position_ids=batch.position_ids,
            logits_to_keep=keep,
            use_cache=False,
            **extra,
        )
    states, targets = out.logits[:, :-1][scored], predicted[scored]
    if head is None:
        return -F.cross_entropy(states.float(), targets, reduction="none")
    return chunked_logps(states, head.weight, head.bias, targets, chunk)


def sequence_logps(
    model: Any, batch: SequenceBatch, chunk: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot summed completion log-probs (differentiable) and completion token counts."""
    logps = token_logps(model, batch, chunk)
    owners = batch.owner[:, 1:][batch.labels[:, 1:] != IGNORE]
    sums = torch.zeros(batch.slots, dtype=torch.float32, device=logps.device)
    counts = torch.zeros(batch.slots, dtype=torch.float32, device=logps.device)
    return sums.index_add(0, owners, logps), counts.index_add(0, owners, torch.ones_like(logps))

"""Forward passes that turn a `SequenceBatch` into per-sequence summed log-probs.

Losses never see logits: they get these sums (and token counts). The model is asked
for logits only from the first scored position on (`logits_to_keep`), so prompt
positions cost no LM-head work.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from alignkit.data.batching import IGNORE, SequenceBatch


def first_scored(labels: torch.Tensor) -> int:
    """The earliest position holding a scored label (at least 1: position 0 has no predictor)."""
    scored = (labels != IGNORE).any(dim=0).nonzero()
    return max(1, int(scored[0])) if len(scored) else labels.shape[1] - 1


def slot_sums(
    logits: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor, slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label log-probs and label counts per slot.

    Args:
        logits: [R, K, V], predicting the labels `labels[:, -K+1:]` from position -K on
            (the last logit predicts past the row and is unused).
        labels, owner: [R, T] label ids (IGNORE where unscored) and their slot (-1 there).
        slots: number of slots.
    Returns:
        (sums [slots] float32, counts [slots] float32).
    """
    k = logits.shape[1]
    targets = labels[:, labels.shape[1] - k + 1 :].reshape(-1)
    owners = owner[:, owner.shape[1] - k + 1 :].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    scored = owners >= 0
    token_logps = -F.cross_entropy(flat[scored].float(), targets[scored], reduction="none")
    sums = torch.zeros(slots, dtype=torch.float32, device=logits.device)
    counts = torch.zeros(slots, dtype=torch.float32, device=logits.device)
    sums = sums.index_add(0, owners[scored], token_logps)
    counts = counts.index_add(0, owners[scored], torch.ones_like(token_logps))
    return sums, counts


def sequence_logps(model: Any, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot summed completion log-probs (differentiable) and completion token counts."""
    keep = batch.input_ids.shape[1] - first_scored(batch.labels) + 1
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=keep,
        use_cache=False,
    )
    return slot_sums(out.logits, batch.labels, batch.owner, batch.slots)

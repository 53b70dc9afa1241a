"""The SFT loss: summed token cross-entropy over trained tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.data.batching import IGNORE


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token negative log-likelihoods over trained positions, and their count.

    Args:
        logits: [B, T, V] model outputs; position t predicts token t + 1.
        labels: [B, T] token ids, IGNORE (-100) where no loss is taken.
    Returns:
        (loss_sum, n_tokens): scalars. Dividing by the token count of the whole
        accumulated batch gives a mean over trained tokens, not a mean of means.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    return loss_sum, (shift_labels != IGNORE).sum()

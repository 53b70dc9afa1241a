"""A trained reward model as a reward: a sequence-classification head's score of the
prompt and completion rendered with the model's own chat template.

`alignkit rm` trains and saves such models; `rm_ids` is the one rendering both the
training and the scoring use, so a score means the same in both.
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.errors import AlignkitError
from alignkit.rewards.base import Message, Prompt

SCORE_BATCH = 8


def rm_ids(messages: list[Message], tokenizer: Any, template: str, max_length: int) -> list[int]:
    """Token ids of a conversation ending with the scored assistant reply, its beginning
    cut when longer than `max_length` (the score is read at the last token)."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[-max_length:]


def reply(prompt: list[Message], completion: str) -> list[Message]:
    return [*prompt, {"role": "assistant", "content": completion}]


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return ids, mask


def last_token_scores(model: Any, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """[N] score of each sequence at its own last token (right padding, any pad id)."""
    ids, mask = right_pad(sequences, pad_id)
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    if logits.shape[0] != len(sequences) or logits.dim() != 2:
        raise AlignkitError("the reward model must return one score per sequence")
    return logits[:, 0].float()


class RewardModel:
    """Scores completions with a saved `AutoModelForSequenceClassification` (one label)."""

    def __init__(self, path: str, max_length: int = 1024, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path)
        except OSError as exc:
            raise AlignkitError(
                f"Reward model '{path}' could not be loaded ({str(exc).splitlines()[0]}). "
                "Give a directory written by alignkit rm (or any sequence-classification model)."
            ) from None
        if self.model.config.num_labels != 1:
            raise AlignkitError(
                f"Reward model '{path}' has {self.model.config.num_labels} labels; a reward "
                "model gives one score (num_labels=1)."
            )
        if not getattr(self.tokenizer, "chat_template", None):
            raise AlignkitError(f"Reward model '{path}' has no chat template in its tokenizer.")
        self.model.to(device).eval()
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        template, pad = self.tokenizer.chat_template, self.tokenizer.pad_token_id or 0
        sequences = [
            rm_ids(reply(p.messages, c), self.tokenizer, template, self.max_length)
            for p, c in zip(prompts, completions, strict=True)
        ]
        scores: list[float] = []
        for s in range(0, len(sequences), SCORE_BATCH):
            chunk = sequences[s : s + SCORE_BATCH]
            scores += last_token_scores(self.model, chunk, pad).tolist()
        return scores

"""Tokenized SFT examples -> padded or packed tensor batches.

Labels are -100 on untrained tokens and on the first token of every example, so no
example is ever predicted from another one's last token (packed) or from padding.
A packed row carries restarting position ids and a block-diagonal causal mask
(additive float, honoured by the eager and sdpa attention of transformers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.tokenize import TokenizedExample

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    input_tokens: int

    @property
    def trained_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device: torch.device) -> Batch:
        tensors = (self.input_ids, self.labels, self.attention_mask, self.position_ids)
        return Batch(*(t.to(device) for t in tensors), self.input_tokens)


def example_labels(example: TokenizedExample) -> list[int]:
    labels = [
        t if m else IGNORE for t, m in zip(example.input_ids, example.labels_mask, strict=True)
    ]
    return [IGNORE, *labels[1:]]


def pad_batch(examples: list[TokenizedExample], pad_id: int) -> Batch:
    """Right-padded batch with a [B, T] attention mask."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example_labels(example))
        mask[row, :n] = 1
    positions = torch.arange(width).expand(len(examples), width).clone()
    return Batch(ids, labels, mask, positions, sum(len(e.input_ids) for e in examples))


def pack_rows(examples: list[TokenizedExample], max_length: int) -> list[list[TokenizedExample]]:
    """Greedy first-fit packing, in order, into rows of at most `max_length` tokens."""
    rows: list[list[TokenizedExample]] = []
    room: list[int] = []
    for example in examples:
        n = len(example.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([example])
            room.append(max_length - n)
        else:
            rows[slot].append(example)
            room[slot] -= n
    return rows


def block_causal_mask(
    sequence_ids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[B, 1, T, T] additive mask: a token sees earlier tokens of its own sequence only.
    Padding has sequence id -1 and sees only itself (its outputs are never used)."""
    width = sequence_ids.shape[1]
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    allowed = (causal & same) | torch.eye(width, dtype=torch.bool)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[
        :, None
    ]


def packed_batch(
    rows: list[list[TokenizedExample]], pad_id: int, dtype: torch.dtype = torch.float32
) -> Batch:
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    sequence = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k, example in enumerate(row):
            n = len(example.input_ids)
            ids[r, start : start + n] = torch.tensor(example.input_ids)
            labels[r, start : start + n] = torch.tensor(example_labels(example))
            positions[r, start : start + n] = torch.arange(n)
            sequence[r, start : start + n] = k
            start += n
    tokens = sum(len(e.input_ids) for row in rows for e in row)
    return Batch(ids, labels, block_causal_mask(sequence, dtype), positions, tokens)

"""Tokenized SFT examples -> padded or packed tensor batches.

Labels are -100 on untrained tokens and on the first token of every example, so no
example is ever predicted from another one's last token (packed) or from padding.
A packed row carries restarting position ids and a block-diagonal causal mask
(additive float, honoured by the eager and sdpa attention of transformers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.tokenize import TokenizedExample, TokenizedFeedback, TokenizedPair

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

    @property
    def units(self) -> int:
        """What the loss is averaged over: trained tokens."""
        return self.trained_tokens

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


# ---------------------------------------------------------------- preference batches


@dataclass
class SequenceBatch:
    """Completions to score: each trained label token belongs to one sequence slot.

    `owner[r, t]` is the slot of the label at (r, t), -1 where no label is scored. For
    pairs, slots 0..B-1 are the chosen and B..2B-1 the rejected completions; for
    unpaired feedback, 0..N-1 the completions and N..2N-1 the mismatched KL ones.
    `ref` holds precomputed reference log-probs per slot when they are cached.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    owner: torch.Tensor
    units: int
    input_tokens: int
    ref: torch.Tensor | None = None
    desirable: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        return 2 * self.units

    @property
    def trained_tokens(self) -> int:
        """Scored tokens, less KTO's mismatched KL sequences (they are never trained)."""
        last = self.units if self.desirable is not None else self.slots
        return int(((self.owner >= 0) & (self.owner < last)).sum())

    def to(self, device: torch.device) -> SequenceBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        tensors = (self.input_ids, self.labels, self.attention_mask, self.position_ids, self.owner)
        return SequenceBatch(*(t.to(device) for t in tensors), self.units, self.input_tokens,
                             move(self.ref), move(self.desirable))  # fmt: skip


def sequence_batch(
    sequences: list[tuple[list[int], list[int]]], units: int, pad_id: int
) -> SequenceBatch:
    """Right-padded rows of prompt + completion, one per slot; labels on completions only."""
    width = max(len(p) + len(c) for p, c in sequences)
    shape = (len(sequences), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    owner = torch.full(shape, -1, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    for slot, (prompt, completion) in enumerate(sequences):
        n, start = len(prompt) + len(completion), len(prompt)
        ids[slot, :n] = torch.tensor(prompt + completion)
        labels[slot, start:n] = torch.tensor(completion)
        owner[slot, start:n] = slot
        mask[slot, :n] = 1
    positions = torch.arange(width).expand(shape).clone()
    tokens = sum(len(p) + len(c) for p, c in sequences)
    return SequenceBatch(ids, labels, mask, positions, owner, units, tokens)


def pair_batch(pairs: list[TokenizedPair], pad_id: int) -> SequenceBatch:
    """Chosen rows first, then rejected rows, as TRL concatenates them."""
    chosen = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    rejected = [(p.prompt_ids, p.rejected_ids) for p in pairs]
    batch = sequence_batch(chosen + rejected, len(pairs), pad_id)
    refs = [p.ref_logps for p in pairs]
    if all(r is not None for r in refs):
        batch.ref = torch.tensor([r[0] for r in refs] + [r[1] for r in refs], dtype=torch.float32)
    return batch


def feedback_batch(items: list[TokenizedFeedback], pad_id: int, max_length: int) -> SequenceBatch:
    """Completions, then each prompt with the next item's completion (KTO's KL estimate).

    A mismatched sequence is cut to `max_length` (its completion end is dropped).
    """
    matched = [(f.prompt_ids, f.completion_ids) for f in items]
    shifted = [
        (f.prompt_ids, items[(i + 1) % len(items)].completion_ids[: max_length - len(f.prompt_ids)])
        for i, f in enumerate(items)
    ]
    batch = sequence_batch(matched + shifted, len(items), pad_id)
    batch.desirable = torch.tensor([f.label for f in items], dtype=torch.bool)
    return batch

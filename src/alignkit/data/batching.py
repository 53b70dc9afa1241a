"""Tokenized SFT examples -> padded or packed tensor batches.

Labels are -100 on untrained tokens and on the first token of every example, so no
example is ever predicted from another one's last token (packed) or from padding.
A packed row carries restarting position ids and a block-diagonal causal mask
(additive float, honoured by the eager and sdpa attention of transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from alignkit.data.tokenize import TokenizedExample, TokenizedFeedback, TokenizedPair
from alignkit.errors import AlignkitError

IGNORE = -100


@dataclass
class Block:
    """Span [start, end) of a flattened row whose tokens attend only inside it, causally.

    A two-branch block is [shared | first branch | second branch]: `second` is the row
    index where the second branch starts, `shared` the shared part's length, and
    `tail_mask` [second branch, shared + second branch] (bool, True = may attend) says
    what the second branch sees: the shared part and itself, never the first branch.
    """

    start: int
    end: int
    shared: int = 0
    second: int | None = None
    tail_mask: torch.Tensor | None = None

    def to(self, device: torch.device) -> Block:
        mask = None if self.tail_mask is None else self.tail_mask.to(device)
        return Block(self.start, self.end, self.shared, self.second, mask)


def move_blocks(blocks: list[Block] | None, device: torch.device) -> list[Block] | None:
    return None if blocks is None else [b.to(device) for b in blocks]


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    input_tokens: int
    blocks: list[Block] | None = None

    @property
    def trained_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    @property
    def units(self) -> int:
        """What the loss is averaged over: trained tokens."""
        return self.trained_tokens

    def to(self, device: torch.device) -> Batch:
        tensors = (self.input_ids, self.labels, self.attention_mask, self.position_ids)
        return Batch(
            *(t.to(device) for t in tensors), self.input_tokens, move_blocks(self.blocks, device)
        )


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
    blocks: list[Block] | None = None

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
        return SequenceBatch(
            *(t.to(device) for t in tensors),
            self.units,
            self.input_tokens,
            move(self.ref),
            move(self.desirable),
            move_blocks(self.blocks, device),
        )


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


def pair_batch(pairs: list[TokenizedPair], pad_id: int, layout: str = "padded") -> SequenceBatch:
    """Slots 0..B-1 chosen, B..2B-1 rejected (TRL's order), laid out as

    `padded`: one right-padded row per sequence; `flat`: every sequence in one row;
    `shared`: one row, each pair's prompt once with its chosen and rejected branches.
    """
    n = len(pairs)
    if layout == "shared":
        batch = flat_batch_of([shared_pair_segment(p, i, n) for i, p in enumerate(pairs)], n)
    else:
        sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs]
        sequences += [(p.prompt_ids, p.rejected_ids) for p in pairs]
        batch = sequences_batch(sequences, n, pad_id, flat=layout == "flat")
    refs = [p.ref_logps for p in pairs]
    if all(r is not None for r in refs):
        batch.ref = torch.tensor([r[0] for r in refs] + [r[1] for r in refs], dtype=torch.float32)
    return batch


def sequences_batch(
    sequences: list[tuple[list[int], list[int]]], units: int, pad_id: int, flat: bool
) -> SequenceBatch:
    if not flat:
        return sequence_batch(sequences, units, pad_id)
    return flat_batch_of([completion_segment(p, c, k) for k, (p, c) in enumerate(sequences)], units)


# ---------------------------------------------------------------- padding-free rows


@dataclass
class Segment:
    """One block of a flattened row: ids, labels, label owners (slot or -1), positions;
    for two branches, the shared length and where the second branch starts."""

    ids: list[int]
    labels: list[int]
    owner: list[int]
    positions: list[int]
    shared: int = 0
    second: int | None = None


def completion_segment(prompt: list[int], completion: list[int], slot: int) -> Segment:
    n = len(prompt) + len(completion)
    return Segment(
        prompt + completion,
        [IGNORE] * len(prompt) + completion,
        [-1] * len(prompt) + [slot] * len(completion),
        list(range(n)),
    )


def shared_pair_segment(pair: TokenizedPair, index: int, units: int) -> Segment:
    """[prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected], two branches on a shared part.

    The prompt's last token starts each branch, so each branch predicts its own first
    completion token; branch positions continue from the shared part's end.
    """
    shared, last = pair.prompt_ids[:-1], pair.prompt_ids[-1]
    s, c, r = len(shared), len(pair.chosen_ids) + 1, len(pair.rejected_ids) + 1
    ids = shared + [last, *pair.chosen_ids] + [last, *pair.rejected_ids]
    labels = [IGNORE] * (s + 1) + pair.chosen_ids + [IGNORE] + pair.rejected_ids
    owner = [-1] * (s + 1) + [index] * (c - 1) + [-1] + [index + units] * (r - 1)
    positions = list(range(s + c)) + list(range(s, s + r))
    return Segment(ids, labels, owner, positions, s, s + c)


def tail_mask(shared: int, second: int) -> torch.Tensor:
    """[second, shared + second] bool: the second branch sees all of the shared part and
    itself causally."""
    mask = torch.ones(second, shared + second, dtype=torch.bool)
    mask[:, shared:] = torch.tril(mask[:, shared:])
    return mask


def flat_row(segments: list[Segment]) -> tuple[list[torch.Tensor], list[Block]]:
    """[1, T] ids, labels, owners and positions of the segments back to back, and their blocks."""
    columns: list[list[int]] = [[], [], [], []]
    blocks = []
    for seg in segments:
        start = len(columns[0])
        for column, values in zip(
            columns, (seg.ids, seg.labels, seg.owner, seg.positions), strict=True
        ):
            column.extend(values)
        end = len(columns[0])
        if seg.second is None:
            blocks.append(Block(start, end))
        else:
            mask = tail_mask(seg.shared, len(seg.ids) - seg.second)
            blocks.append(Block(start, end, seg.shared, start + seg.second, mask))
    return [torch.tensor([c], dtype=torch.long) for c in columns], blocks


def flat_batch_of(segments: list[Segment], units: int) -> SequenceBatch:
    (ids, labels, owner, positions), blocks = flat_row(segments)
    mask = torch.ones_like(ids)
    return SequenceBatch(ids, labels, mask, positions, owner, units, ids.shape[1], blocks=blocks)


def flat_batch(examples: list[TokenizedExample]) -> Batch:
    """SFT examples in one padding-free row, each attending only to itself."""
    segments = [
        Segment(
            e.input_ids, example_labels(e), [0] * len(e.input_ids), list(range(len(e.input_ids)))
        )
        for e in examples
    ]
    (ids, labels, _, positions), blocks = flat_row(segments)
    return Batch(ids, labels, torch.ones_like(ids), positions, ids.shape[1], blocks)


def with_kl_completions(
    rows: list[TokenizedFeedback], spare: list[TokenizedFeedback]
) -> list[TokenizedFeedback]:
    """Each row with the next row's completion as its mismatched KL completion (the last
    row takes the first's), fixed per row so that a batch of one still has a true pair.

    A single row takes the first of `spare` (the other split); a single row in all is an
    error, as it has no other completion to pair with.
    """
    donors = rows if len(rows) > 1 else rows + spare
    if len(donors) == 1:
        raise AlignkitError(
            "KTO scores each prompt with another row's completion for its KL estimate, and "
            "the data has only one row. Add rows to data.sources."
        )
    return [
        replace(row, kl_completion_ids=donors[(i + 1) % len(donors)].completion_ids)
        for i, row in enumerate(rows)
    ]


def feedback_batch(
    items: list[TokenizedFeedback], pad_id: int, max_length: int, flat: bool = False
) -> SequenceBatch:
    """Completions, then each prompt with its row's KL completion (KTO's KL estimate).

    A mismatched sequence is cut to `max_length` (its completion end is dropped).
    """
    matched = [(f.prompt_ids, f.completion_ids) for f in items]
    shifted = [(f.prompt_ids, kl_completion(f)[: max_length - len(f.prompt_ids)]) for f in items]
    batch = sequences_batch(matched + shifted, len(items), pad_id, flat)
    batch.desirable = torch.tensor([f.label for f in items], dtype=torch.bool)
    return batch


def kl_completion(item: TokenizedFeedback) -> list[int]:
    if item.kl_completion_ids is None:
        raise ValueError("feedback rows need their KL completions: see with_kl_completions")
    return item.kl_completion_ids

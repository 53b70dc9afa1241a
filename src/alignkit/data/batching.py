"""Tokenized examples -> padded rows, or padding-free rows whose blocks keep attention
inside each sequence (see alignkit.train.attention).

Labels are -100 on untrained tokens and on the first token of every example, so no
example is ever predicted from another one's last token (padding-free, packed) or from
padding. Packed bins of examples run as padding-free rows.
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


# prompt ids, completion ids, which completion ids are scored (None: all)
Sequence = tuple[list[int], list[int], list[bool] | None]


def scored_labels(completion: list[int], scored: list[bool] | None) -> list[int]:
    """The completion's ids as labels, IGNORE where a token is not scored."""
    if scored is None:
        return completion
    return [t if s else IGNORE for t, s in zip(completion, scored, strict=True)]


def label_owners(labels: list[int], slot: int) -> list[int]:
    return [-1 if t == IGNORE else slot for t in labels]


def sequence_batch(sequences: list[Sequence], units: int, pad_id: int) -> SequenceBatch:
    """Right-padded rows of prompt + completion, one per slot; labels on scored completion
    tokens only."""
    width = max(len(p) + len(c) for p, c, _ in sequences)
    shape = (len(sequences), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    owner = torch.full(shape, -1, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    for slot, (prompt, completion, scored) in enumerate(sequences):
        n, start = len(prompt) + len(completion), len(prompt)
        completion_labels = scored_labels(completion, scored)
        ids[slot, :n] = torch.tensor(prompt + completion)
        labels[slot, start:n] = torch.tensor(completion_labels)
        owner[slot, start:n] = torch.tensor(label_owners(completion_labels, slot))
        mask[slot, :n] = 1
    positions = torch.arange(width).expand(shape).clone()
    tokens = sum(len(p) + len(c) for p, c, _ in sequences)
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
        sequences = [(p.prompt_ids, p.chosen_ids, p.chosen_mask) for p in pairs]
        sequences += [(p.prompt_ids, p.rejected_ids, p.rejected_mask) for p in pairs]
        batch = sequences_batch(sequences, n, pad_id, flat=layout == "flat")
    refs = [p.ref_logps for p in pairs]
    if all(r is not None for r in refs):
        batch.ref = torch.tensor([r[0] for r in refs] + [r[1] for r in refs], dtype=torch.float32)
    return batch


def sequences_batch(
    sequences: list[Sequence], units: int, pad_id: int, flat: bool
) -> SequenceBatch:
    if not flat:
        return sequence_batch(sequences, units, pad_id)
    return flat_batch_of([completion_segment(s, k) for k, s in enumerate(sequences)], units)


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
    tail: torch.Tensor | None = None  # the tail's mask when not `tail_mask`'s (see Block)


def completion_segment(sequence: Sequence, slot: int) -> Segment:
    prompt, completion, scored = sequence
    labels = scored_labels(completion, scored)
    return Segment(
        prompt + completion,
        [IGNORE] * len(prompt) + labels,
        [-1] * len(prompt) + label_owners(labels, slot),
        list(range(len(prompt) + len(completion))),
    )


def shared_pair_segment(pair: TokenizedPair, index: int, units: int) -> Segment:
    """[prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected], two branches on a shared part.

    The prompt's last token starts each branch, so each branch predicts its own first
    completion token; branch positions continue from the shared part's end.
    """
    shared, last = pair.prompt_ids[:-1], pair.prompt_ids[-1]
    s, c, r = len(shared), len(pair.chosen_ids) + 1, len(pair.rejected_ids) + 1
    ids = shared + [last, *pair.chosen_ids] + [last, *pair.rejected_ids]
    chosen = scored_labels(pair.chosen_ids, pair.chosen_mask)
    rejected = scored_labels(pair.rejected_ids, pair.rejected_mask)
    labels = [IGNORE] * (s + 1) + chosen + [IGNORE] + rejected
    owner = [-1] * (s + 1) + label_owners(chosen, index) + [-1]
    owner += label_owners(rejected, index + units)
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
            mask = (
                seg.tail
                if seg.tail is not None
                else tail_mask(seg.shared, end - start - seg.second)
            )
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
    donors = list(rows) if len(rows) > 1 else list(rows) + list(spare)
    if len(donors) == 1:
        raise AlignkitError(
            "KTO scores each prompt with another row's completion for its KL estimate, and "
            "the data has only one row. Add rows to data.sources."
        )
    return [
        replace(
            row, kl_completion_ids=donor.completion_ids, kl_completion_mask=donor.completion_mask
        )
        for row, donor in zip(rows, donors[1:] + donors[:1], strict=False)
    ]


def feedback_batch(
    items: list[TokenizedFeedback], pad_id: int, max_length: int, flat: bool = False
) -> SequenceBatch:
    """Completions, then each prompt with its row's KL completion (KTO's KL estimate).

    A mismatched sequence is cut to `max_length` (its completion end is dropped).
    """
    matched = [(f.prompt_ids, f.completion_ids, f.completion_mask) for f in items]
    shifted = [mismatched(f, max_length) for f in items]
    batch = sequences_batch(matched + shifted, len(items), pad_id, flat)
    batch.desirable = torch.tensor([f.label for f in items], dtype=torch.bool)
    return batch


def mismatched(item: TokenizedFeedback, max_length: int) -> Sequence:
    """`item`'s prompt with its KL completion (another row's), cut to `max_length`."""
    if item.kl_completion_ids is None:
        raise ValueError("feedback rows need their KL completions: see with_kl_completions")
    keep = max_length - len(item.prompt_ids)
    mask = None if item.kl_completion_mask is None else item.kl_completion_mask[:keep]
    return item.prompt_ids, item.kl_completion_ids[:keep], mask

"""Decoding requests together: one running batch that rows join and leave at step boundaries.

A thread (`Batcher.run`) owns the batch. Between two decoding steps it admits the requests
that arrived meanwhile (their prompts run through the model as one left-padded group, and
their KV cache is joined to the batch's), and it drops the rows that finished or were
cancelled. Each row keeps its own sampling settings, token budget and stops, so a row that
ends early leaves the others as they were.

Left padding with an attention mask and explicit position ids gives each row the logits it
would get alone (up to float rounding), so a greedy request decodes the same tokens batched
or not. Joining caches needs plain attention caches (every layer a `DynamicLayer`); a model
with another kind (sliding windows, recurrent state) decodes one request at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch


class Cancelled(Exception):
    """The request was stopped: its client left, or the server is shutting down."""


@dataclass(frozen=True)
class Sampler:
    """How one row picks its next token; temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


@dataclass
class Request:
    """What one row decodes: prompt ids, a new-token budget, sampling, stop strings, where
    its text streams to, and the flag that cancels it."""

    ids: list[int]
    budget: int
    sampler: Sampler = Sampler()
    stops: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Decoded:
    ids: list[int]  # the new tokens, a final stop token included
    text: str  # their text, special tokens left out
    reason: str  # "stop" (a stop token or string) or "length" (the budget)


@dataclass
class Row:
    """A request in the batch: its result, its random stream and what it made so far."""

    request: Request
    result: Future = field(default_factory=Future)
    generator: torch.Generator | None = None
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    reason: str | None = None  # set once the row has finished


# ---------------------------------------------------------------- sampling


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(scores, min(k, scores.shape[-1])).values[-1]
    return scores.masked_fill(scores < kth, float("-inf"))


def keep_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """The smallest set of most likely tokens whose probability reaches `p`."""
    ordered, order = scores.sort(descending=True)
    before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the better ones
    drop = torch.zeros_like(scores, dtype=torch.bool)
    drop[order] = before >= p
    return scores.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, sampler: Sampler, generator: torch.Generator | None) -> int:
    """The next token from one row's logits (a 1-D tensor on the CPU)."""
    if sampler.temperature == 0:
        return int(logits.argmax())
    scores = logits.float() / sampler.temperature
    if sampler.top_k:
        scores = keep_top_k(scores, sampler.top_k)
    if sampler.top_p < 1:
        scores = keep_top_p(scores, sampler.top_p)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


# ---------------------------------------------------------------- padding and caches


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of sequences right-aligned in one tensor."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    return ids, mask


def is_plain(cache: Any) -> bool:
    """Whether a cache holds only full-attention key/value tensors (joinable by rows)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return (
        isinstance(cache, DynamicCache)
        and bool(layers)
        and all(type(layer) is DynamicLayer for layer in layers)
    )


def pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros in front along `dim` up to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def join(cache: Any, mask: torch.Tensor, extra: Any, extra_mask: torch.Tensor) -> torch.Tensor:
    """Append `extra`'s rows to `cache` (both right-aligned, the shorter padded on the
    left, in place); the joined attention mask. Nothing changes if it fails midway."""
    width = max(mask.shape[1], extra_mask.shape[1])

    def stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([pad_left(a, width, 2), pad_left(b, width, 2)])

    joined = [
        (stack(layer.keys, other.keys), stack(layer.values, other.values))
        for layer, other in zip(cache.layers, extra.layers, strict=True)
    ]
    for layer, (keys, values) in zip(cache.layers, joined, strict=True):
        layer.keys, layer.values = keys, values
    return torch.cat([pad_left(mask, width, 1), pad_left(extra_mask, width, 1)])


def keep_rows(cache: Any, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Drop the other rows from `cache` (in place) and the columns only they used; the mask."""
    index = torch.tensor(keep, device=mask.device)
    cache.batch_select_indices(index)
    mask = mask[index]
    start = int(mask.any(0).long().argmax())  # the first column a remaining row uses
    if start:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
    return mask[:, start:]


# ---------------------------------------------------------------- the batch


@dataclass
class Batcher:
    """The running batch of one model: requests go in with `decode`, a thread steps them."""

    model: Any
    tokenizer: Any
    stop_ids: set[int]
    stopping: threading.Event
    max_batch: int = 8
    pending: list[Row] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor | None = None
    joinable: bool | None = None  # learned from the first prompt's cache
    largest: int = 0  # the most rows decoded together so far
    wake: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None

    def decode(self, request: Request) -> Decoded:
        """Decode `request` in the batch; blocks until it ends (raises Cancelled if stopped)."""
        row = Row(request)
        if request.sampler.temperature > 0:
            row.generator = torch.Generator().manual_seed(request.sampler.seed)
        with self.wake:
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="batcher", daemon=True)
                self.thread.start()
            self.pending.append(row)
            self.wake.notify()
        return row.result.result()

    def run(self) -> None:
        while True:
            new = self.admit()
            if new:
                self.fail_on_error(new, self.prefill, new)
            if self.rows:
                self.fail_on_error(list(self.rows), self.step)

    def fail_on_error(self, rows: list[Row], work: Callable[..., None], *args: Any) -> None:
        """Run a forward pass; if the model raises, the rows it ran end with the error (the
        new rows of a prompt pass, every row of a step) and the server goes on."""
        try:
            work(*args)
        except Exception as exc:  # noqa: BLE001 - the clients hear of it as a 500
            for row in rows:
                self.end(row, "error", exc)
            self.drop_ended()

    def end(self, row: Row, reason: str, error: Exception | None = None) -> None:
        """Mark a row finished (with its result, or an error) unless it already is."""
        if row.reason is not None:
            return
        row.reason = reason
        if error is None:
            row.result.set_result(Decoded(list(row.out), row.text, reason))
        else:
            row.result.set_exception(error)

    def drop_ended(self) -> None:
        """Take the finished rows out of the batch, and out of its cache."""
        keep = [i for i, r in enumerate(self.rows) if r.reason is None]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if keep:
            self.mask = keep_rows(self.cache, self.mask, keep)
        else:
            self.cache, self.mask = None, None

    def admit(self) -> list[Row]:
        """Wait for work; the waiting requests that join now (cancelled ones end here)."""
        with self.wake:
            while not self.rows and not self.pending:
                self.wake.wait()
            for row in [r for r in self.pending if self.stopped(r)]:
                self.pending.remove(row)
                self.end(row, "cancelled", Cancelled())
            if self.joinable is None:  # first learn whether caches can be joined
                room = 0 if self.rows else 1
            else:
                room = self.max_batch - len(self.rows) if self.joinable else int(not self.rows)
            new, self.pending[:room] = self.pending[:room], []
            return new

    def stopped(self, row: Row) -> bool:
        return row.request.cancel.is_set() or self.stopping.is_set()

    @torch.inference_mode()
    def prefill(self, new: list[Row]) -> None:
        """Run the new rows' prompts as one group, join them to the batch, pick their first
        tokens."""
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id or 0
        ids, mask = left_pad([r.request.ids for r in new], pad)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
        )
        if self.joinable is None:
            self.joinable = is_plain(out.past_key_values)
        if self.rows:
            self.mask = join(self.cache, self.mask, out.past_key_values, mask)
        else:
            self.cache, self.mask = out.past_key_values, mask
        self.rows += new
        self.largest = max(self.largest, len(self.rows))
        self.advance(new, out.logits[:, -1])

    @torch.inference_mode()
    def step(self) -> None:
        """Feed every row its last token; pick the next."""
        device = self.mask.device
        last = torch.tensor([[r.out[-1]] for r in self.rows], device=device)
        positions = self.mask.sum(-1, keepdim=True)  # each row's count of real tokens
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        out = self.model(
            input_ids=last,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            logits_to_keep=1,
        )
        self.advance(self.rows, out.logits[:, -1])

    def advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Append each of `rows` its next token (from its row of `logits`), end the rows
        that are done or cancelled, and drop those from the batch."""
        greedy = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            sampler = row.request.sampler
            try:
                token = (
                    greedy[i]
                    if sampler.temperature == 0
                    else sample(logits[i].cpu(), sampler, row.generator)
                )
                self.extend(row, token)
            except Exception as exc:  # noqa: BLE001 - e.g. its client's stream is gone
                self.end(row, "error", exc)
        for row in self.rows:
            if self.stopped(row):
                self.end(row, "cancelled", Cancelled())
        self.drop_ended()

    def extend(self, row: Row, token: int) -> None:
        """Add a token to a row: stream its text, and end the row on a stop or its budget."""
        row.out.append(token)
        request = row.request
        if request.on_text or request.stops:
            row.text = self.tokenizer.decode(row.out, skip_special_tokens=True)
            if request.on_text and not row.text.endswith("\ufffd"):  # not mid-character
                self.stream(row)
        if token in self.stop_ids or any(s in row.text for s in request.stops):
            self.finish(row, "stop")
        elif len(row.out) >= request.budget:
            self.finish(row, "length")

    def stream(self, row: Row) -> None:
        if len(row.text) > row.sent:
            row.request.on_text(row.text[row.sent :])
            row.sent = len(row.text)

    def finish(self, row: Row, reason: str) -> None:
        """End a row with its whole text (streaming what is left of it)."""
        row.text = self.tokenizer.decode(row.out, skip_special_tokens=True)
        if row.request.on_text:
            self.stream(row)
        self.end(row, reason)

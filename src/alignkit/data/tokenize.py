"""Canonical examples -> token ids with loss masks; preference pairs -> prompt/chosen/rejected ids.

A text is tokenized whole (so ids equal `apply_chat_template`'s), and a token is trained
when its characters overlap a trained assistant span (see `chat_templates`). A
conversation whose template re-renders earlier turns gives one example per rendering.

A pair's prompt is the text both branches render the same before their first scored
token; each completion runs from there to its last end-of-turn marker and scores only
its assistant turns (user turns inside a multi-turn branch are context). The prompt ids
are checked to be a true prefix of the prompt+completion ids; where a tokenizer merges
across the boundary, the completion is tokenized on its own after the prompt ids (what
the model sees when it generates from that prompt) and counted.

Left truncation keeps the BOS token and the system turn, then the end of the prompt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property, partial
from itertools import chain
from typing import Any, TypeVar

import numpy as np

from alignkit.chat_templates import (
    ChatTemplate,
    Rendering,
    assistant_renderings,
    completion_rendering,
    protected_head,
    shared_prompt,
)
from alignkit.config import DataConfig
from alignkit.data.formats import Example, Feedback, Message, PreferencePair
from alignkit.errors import AlignkitError

LONGER_THAN_MAX = "longer than max_length"
HEAD_TOO_LONG = "BOS and system turn alone exceed the prompt budget"
END_OF_TURN_INSIDE = "end-of-turn marker inside the text"
NO_ASSISTANT_TOKENS = "no assistant tokens within max_length"
IDENTICAL_AFTER_RENDERING = "chosen and rejected render identically"
IDENTICAL_AFTER_TRUNCATION = "identical after truncation"
BATCH = 256  # rows whose texts are encoded in one tokenizer call


@dataclass
class TokenizedExample:
    """One SFT row: `labels_mask[i]` says whether token i is trained."""

    input_ids: list[int]
    labels_mask: list[bool]


@dataclass
class TokenizedPair:
    """One preference pair; each completion ends with the template's end-of-turn token.

    A mask says which completion tokens are scored (None: all of them); user turns
    inside a multi-turn completion are not.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_logps: tuple[float, float] | None = None  # reference (chosen, rejected), when precomputed
    chosen_mask: list[bool] | None = None
    rejected_mask: list[bool] | None = None


@dataclass
class TokenizedFeedback:
    """One unpaired completion; `kl_completion_ids` is another row's completion, scored
    after this prompt for KTO's KL estimate (set by `batching.with_kl_completions`)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    completion_mask: list[bool] | None = None  # scored completion tokens; None: all
    kl_completion_ids: list[int] | None = None
    kl_completion_mask: list[bool] | None = None


@dataclass
class TokenizeReport:
    """Counts of what the template and truncation did; printed with every data load.

    A row gives one example, or one per rendering when the template re-renders earlier
    turns (`split_rows` rows made `split_examples` examples); `kept`, `truncated` and
    `dropped` count examples.
    """

    rows: int = 0
    kept: int = 0
    split_rows: int = 0
    split_examples: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    retokenized_at_boundary: int = 0

    @property
    def examples(self) -> int:
        return self.rows - self.split_rows + self.split_examples

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.examples} examples kept from {self.rows} rows"]
        if self.split_rows:
            parts.append(
                f"{self.split_rows} rows split by turn into {self.split_examples} examples "
                "(the template re-renders earlier turns)"
            )
        parts.append(f"{self.truncated} truncated")
        parts += [f"{n} dropped ({why})" for why, n in self.dropped.items()]
        if self.retokenized_at_boundary:
            parts.append(f"{self.retokenized_at_boundary} re-tokenized at the prompt boundary")
        return ", ".join(parts)


@dataclass(frozen=True)
class Tokenized:
    """One tokenized example and what tokenization did to it."""

    item: TokenizedExample | TokenizedPair | TokenizedFeedback
    truncated: bool = False
    retokenized: bool = False  # completion tokenized on its own at the prompt boundary


class Dropped(Exception):
    """An example that cannot be kept under the current settings."""


def plan_truncation(
    prompt_len: int, completion_len: int, max_length: int, max_prompt_length: int, policy: str
) -> tuple[int, int] | None:
    """How many prompt tokens and completion tokens (kept from the start) survive, or None
    to drop the example.

    Nothing is cut when prompt + completion fits in `max_length`. Otherwise `drop` drops
    it, and `truncate_prompt_left` keeps as much of the prompt as leaves room for the
    whole completion, but never less than `max_prompt_length` tokens of it; the completion
    is then cut to what is left. `cut_prompt` says which prompt tokens those are.
    """
    if prompt_len + completion_len <= max_length:
        return prompt_len, completion_len
    if policy == "drop":
        return None
    keep_prompt = min(prompt_len, max(max_prompt_length, max_length - completion_len))
    keep_completion = min(completion_len, max_length - keep_prompt)
    if keep_completion <= 0:
        return None
    return keep_prompt, keep_completion


T = TypeVar("T")


def cut_prompt(values: list[T], keep: int, head: int) -> list[T]:
    """`keep` of a prompt's values: its first `head` (BOS and the system turn), then its end.

    Raises `Dropped` when the head alone leaves no room for the end.
    """
    if keep >= len(values):
        return values
    if head >= keep:
        raise Dropped(HEAD_TOO_LONG)
    return values[:head] + values[len(values) - (keep - head) :]


def prompt_limit(cfg: DataConfig) -> int:
    """The prompt tokens kept at least when truncating (half of max_length unless set)."""
    return cfg.max_length // 2 if cfg.max_prompt_length is None else cfg.max_prompt_length


@dataclass(frozen=True)
class Encoded:
    """A text's token ids and each token's [start, end) characters."""

    ids: list[int]
    offsets: list[tuple[int, int]]

    @cached_property
    def bounds(self) -> np.ndarray:
        """The offsets as an (n, 2) array."""
        flat = chain.from_iterable(self.offsets)
        return np.fromiter(flat, dtype=np.int64, count=2 * len(self.offsets)).reshape(-1, 2)

    def first_ending_after(self, char: int) -> int:
        """The first token that ends after character `char` (len(ids) when none does)."""
        after = np.flatnonzero(self.bounds[:, 1] > char)
        return int(after[0]) if len(after) else len(self.ids)

    def mask(self, spans: list[tuple[int, int]]) -> list[bool]:
        """Whether each token overlaps one of the character spans."""
        if not self.ids:
            return []
        starts, ends = self.bounds.T
        overlap = np.zeros(len(self.ids), dtype=bool)
        for start, end in spans:
            overlap |= (starts < end) & (ends > start)
        return overlap.tolist()


def plain_backend(tokenizer: Any) -> Any:
    """The fast tokenizer's `tokenizers.Tokenizer` when encoding with it gives what calling
    the tokenizer does (no truncation or padding set on it, special tokens split as the
    tokenizer says), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend if getattr(backend, "encode_special_tokens", split) == split else None


def encode_texts(texts: list[str], tokenizer: Any) -> list[Encoded]:
    """The texts tokenized whole, in one call (no special tokens added).

    A fast tokenizer's backend encodes them directly, skipping the per-text dict of ids,
    attention mask and offsets that calling the tokenizer builds (the same ids and offsets:
    transformers calls that backend with the same arguments)."""
    if not texts:
        return []
    backend = plain_backend(tokenizer)
    if backend is not None:
        return [
            Encoded(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)
        ]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [
        Encoded(list(ids), [tuple(o) for o in offsets])
        for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]


def head_tokens(
    messages: list[Message],
    text: str,
    offsets: list[tuple[int, int]],
    template: ChatTemplate,
    tokenizer: Any,
) -> int:
    """How many leading tokens of `text` (a rendering of `messages`) hold its BOS token and
    system turn."""
    chars = protected_head(messages, text, template, tokenizer)
    return next((i for i, (_, end) in enumerate(offsets) if end > chars), len(offsets))


def tokenize_rendering(
    rendering: Rendering,
    messages: list[Message],
    tokenizer: Any,
    template: ChatTemplate,
    cfg: DataConfig,
    encodings: list[Encoded],
) -> Tokenized:
    """Token ids and loss mask for one rendering of an SFT conversation (`encodings`: its text's).

    The last trained turn is the completion truncation keeps from its start; everything
    before it is the prompt. Raises `Dropped` to drop the example.
    """
    (encoded,) = encodings
    ids, offsets = encoded.ids, encoded.offsets
    mask = [True] * len(ids) if cfg.train_on_prompt else encoded.mask(rendering.spans)
    last = encoded.first_ending_after(rendering.spans[-1][0])
    plan = plan_truncation(last, len(ids) - last, cfg.max_length, prompt_limit(cfg), cfg.truncation)
    if plan is None:
        raise Dropped(LONGER_THAN_MAX)
    keep_prompt, keep_completion = plan
    if (keep_prompt, keep_completion) == (last, len(ids) - last):
        return Tokenized(TokenizedExample(ids, mask))
    head = head_tokens(messages, rendering.text, offsets, template, tokenizer)
    end = last + keep_completion
    return Tokenized(
        TokenizedExample(
            cut_prompt(ids[:last], keep_prompt, head) + ids[last:end],
            cut_prompt(mask[:last], keep_prompt, head) + mask[last:end],
        ),
        truncated=True,
    )


@dataclass(frozen=True)
class Completion:
    """Completion ids and which of them are scored."""

    ids: list[int]
    mask: list[bool]

    def cut(self, keep: int) -> Completion:
        return Completion(self.ids[:keep], self.mask[:keep])

    def stored_mask(self) -> list[bool] | None:
        return None if all(self.mask) else self.mask


def encode_completion(
    branch: Rendering, encoded: Encoded, prompt_text: str, prompt_ids: list[int], tokenizer: Any
) -> tuple[Completion, bool]:
    """The branch's ids after `prompt_ids` (`encoded`: the branch's text), its assistant
    turns scored.

    Returns the completion and whether the joint tokenization had to be split at the boundary.
    """
    ids, mask = encoded.ids, encoded.mask(branch.spans)
    if ids[: len(prompt_ids)] == prompt_ids:
        return Completion(ids[len(prompt_ids) :], mask[len(prompt_ids) :]), False
    shift = len(prompt_text)
    spans = [(start - shift, end - shift) for start, end in branch.spans]
    (alone,) = encode_texts([branch.text[shift:]], tokenizer)
    return Completion(alone.ids, alone.mask(spans)), True


def check_completion(completion: Completion, eot_id: int, turns: int) -> None:
    """The end-of-turn token closes the completion and each scored turn, and only them."""
    scored = [t for t, m in zip(completion.ids, completion.mask, strict=True) if m]
    if not scored or completion.ids[-1] != eot_id or scored.count(eot_id) != turns:
        raise Dropped(END_OF_TURN_INSIDE)


@dataclass(frozen=True)
class Prompted:
    """A prompt's ids and the completions that continue it, fitted to max_length."""

    prompt_ids: list[int]
    completions: list[Completion]
    truncated: bool
    retokenized: bool


@dataclass(frozen=True)
class Branches:
    """A prompt's rendered completions and the prompt text they all continue."""

    prompt: list[Message]
    renderings: list[Rendering]
    prompt_text: str

    @property
    def texts(self) -> list[str]:
        return [self.prompt_text, *(b.text for b in self.renderings)]


def render_branches(
    prompt: list[Message], completions: list[list[Message]], tokenizer: Any, template: ChatTemplate
) -> Branches:
    renderings = [completion_rendering(prompt, c, template, tokenizer) for c in completions]
    return Branches(prompt, renderings, shared_prompt(prompt, renderings, template, tokenizer))


def fit_prompted(
    branches: Branches,
    encodings: list[Encoded],
    tokenizer: Any,
    template: ChatTemplate,
    cfg: DataConfig,
) -> Prompted:
    """Shared prompt ids and one scored completion per branch, truncated together
    (`encodings`: of `branches.texts`)."""
    prompt_enc, *branch_encs = encodings
    prompt_ids, offsets, prompt_text = prompt_enc.ids, prompt_enc.offsets, branches.prompt_text
    encoded = [
        encode_completion(b, e, prompt_text, prompt_ids, tokenizer)
        for b, e in zip(branches.renderings, branch_encs, strict=True)
    ]
    eot_id = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    for (completion, _), branch in zip(encoded, branches.renderings, strict=True):
        check_completion(completion, eot_id, len(branch.spans))
    longest = max(len(c.ids) for c, _ in encoded)
    plan = plan_truncation(
        len(prompt_ids), longest, cfg.max_length, prompt_limit(cfg), cfg.truncation
    )
    if plan is None:
        raise Dropped(LONGER_THAN_MAX)
    keep_prompt, keep_completion = plan
    truncated = (keep_prompt, keep_completion) != (len(prompt_ids), longest)
    if keep_prompt < len(prompt_ids):
        head = head_tokens(branches.prompt, prompt_text, offsets, template, tokenizer)
        prompt_ids = cut_prompt(prompt_ids, keep_prompt, head)
    fitted = [c.cut(keep_completion) for c, _ in encoded]
    if not all(any(c.mask) for c in fitted):
        raise Dropped(NO_ASSISTANT_TOKENS)
    return Prompted(prompt_ids, fitted, truncated, any(split for _, split in encoded))


def pair_item(fitted: Prompted) -> Tokenized:
    """The pair's prompt and completions; a pair whose branches end up token-identical
    is dropped."""
    chosen, rejected = fitted.completions
    if chosen == rejected:
        raise Dropped(IDENTICAL_AFTER_TRUNCATION if fitted.truncated else IDENTICAL_AFTER_RENDERING)
    item = TokenizedPair(
        fitted.prompt_ids,
        chosen.ids,
        rejected.ids,
        chosen_mask=chosen.stored_mask(),
        rejected_mask=rejected.stored_mask(),
    )
    return Tokenized(item, fitted.truncated, fitted.retokenized)


def feedback_item(fitted: Prompted, label: bool) -> Tokenized:
    (completion,) = fitted.completions
    tokenized = TokenizedFeedback(
        fitted.prompt_ids, completion.ids, label, completion.stored_mask()
    )
    return Tokenized(tokenized, fitted.truncated, fitted.retokenized)


@dataclass(frozen=True)
class Draft:
    """One example rendered: the texts it needs encoded, and what makes it from their
    encodings (raises `Dropped` to drop it). Rows are rendered first, then all their texts
    are encoded in one tokenizer call."""

    texts: list[str]
    finish: Callable[[list[Encoded]], Tokenized]

    def run(self, tokenizer: Any) -> Tokenized:
        return self.finish(encode_texts(self.texts, tokenizer))


def _finish_prompted(
    make: Callable[[Prompted], Tokenized],
    branches: Branches,
    tokenizer: Any,
    template: ChatTemplate,
    cfg: DataConfig,
    encodings: list[Encoded],
) -> Tokenized:
    return make(fit_prompted(branches, encodings, tokenizer, template, cfg))


def prompted_draft(
    prompt: list[Message],
    completions: list[list[Message]],
    make: Callable[[Prompted], Tokenized],
    tokenizer: Any,
    template: ChatTemplate,
    cfg: DataConfig,
) -> Draft:
    branches = render_branches(prompt, completions, tokenizer, template)
    return Draft(
        branches.texts, partial(_finish_prompted, make, branches, tokenizer, template, cfg)
    )


def tokenize_pair(
    pair: PreferencePair, tokenizer: Any, template: ChatTemplate, cfg: DataConfig
) -> Tokenized:
    """One preference pair tokenized on its own."""
    completions = [pair.chosen, pair.rejected]
    return prompted_draft(pair.prompt, completions, pair_item, tokenizer, template, cfg).run(
        tokenizer
    )


def check_prompt_limit(cfg: DataConfig) -> None:
    """The prompt's share of max_length leaves room for a completion."""
    if prompt_limit(cfg) >= cfg.max_length:
        raise AlignkitError(
            f"data.max_prompt_length ({cfg.max_prompt_length}) must be below data.max_length "
            f"({cfg.max_length}) to leave room for the completion."
        )


@dataclass(frozen=True)
class Outcome:
    """One example a row makes: its tokenized item, or why it was dropped."""

    first: bool  # the row's first example
    examples: int  # how many examples the row makes
    item: TokenizedExample | TokenizedPair | TokenizedFeedback | None = None
    dropped: str | None = None
    truncated: bool = False
    retokenized: bool = False


def batch_outcomes(
    examples: list[Example], tokenizer: Any, template: ChatTemplate, cfg: DataConfig
) -> list[Outcome]:
    """What tokenizing the rows gives: one outcome per example each row makes, in order."""
    drafts = [_drafts(example, tokenizer, template, cfg) for example in examples]
    encodings = iter(encode_texts([t for row in drafts for d in row for t in d.texts], tokenizer))
    outcomes = []
    for row in drafts:
        for n, draft in enumerate(row):
            head = {"first": n == 0, "examples": len(row)}
            try:
                done = draft.finish([next(encodings) for _ in draft.texts])
            except Dropped as why:
                outcomes.append(Outcome(**head, dropped=str(why)))
                continue
            outcomes.append(
                Outcome(
                    **head, item=done.item, truncated=done.truncated, retokenized=done.retokenized
                )
            )
    return outcomes


def tally(report: TokenizeReport, outcomes: Iterable[Outcome]) -> TokenizeReport:
    """Count the outcomes into `report` (its `rows` set by the caller)."""
    for outcome in outcomes:
        if outcome.first and outcome.examples > 1:
            report.split_rows += 1
            report.split_examples += outcome.examples
        if outcome.dropped is not None:
            report.dropped[outcome.dropped] += 1
            continue
        report.kept += 1
        report.truncated += outcome.truncated
        report.retokenized_at_boundary += outcome.retokenized
    return report


def tokenize_examples(
    examples: list[Example], tokenizer: Any, template: ChatTemplate, cfg: DataConfig
) -> tuple[list[Any], TokenizeReport]:
    """Tokenize a list of canonical examples of one kind, counting every change."""
    check_prompt_limit(cfg)
    outcomes = [
        o
        for start in range(0, len(examples), BATCH)
        for o in batch_outcomes(examples[start : start + BATCH], tokenizer, template, cfg)
    ]
    report = tally(TokenizeReport(rows=len(examples)), outcomes)
    return [o.item for o in outcomes if o.item is not None], report


def _drafts(
    example: Example, tokenizer: Any, template: ChatTemplate, cfg: DataConfig
) -> list[Draft]:
    """One draft per example the row makes (a conversation: one per rendering)."""
    if isinstance(example, PreferencePair):
        completions = [example.chosen, example.rejected]
        return [prompted_draft(example.prompt, completions, pair_item, tokenizer, template, cfg)]
    if isinstance(example, Feedback):
        make = partial(feedback_item, label=example.label)
        return [
            prompted_draft(example.prompt, [example.completion], make, tokenizer, template, cfg)
        ]
    renderings = assistant_renderings(example.messages, template, tokenizer)
    return [
        Draft([r.text], partial(tokenize_rendering, r, example.messages, tokenizer, template, cfg))
        for r in renderings
    ]

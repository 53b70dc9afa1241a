"""Canonical examples -> token ids with loss masks; preference pairs -> prompt/chosen/rejected ids.

The whole rendered text is tokenized at once (so ids equal `apply_chat_template`'s),
and a token is trained when its characters overlap an assistant span. A pair's
prompt ids are checked to be a true prefix of the prompt+completion ids; where a
tokenizer merges across the boundary, the completion is tokenized on its own after
the prompt ids (what the model sees when it generates from that prompt) and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from alignkit.chat_templates import ChatTemplate, assistant_spans, render
from alignkit.config import DataConfig
from alignkit.data.formats import Conversation, Example, Feedback, Message, PreferencePair
from alignkit.errors import AlignkitError


@dataclass
class TokenizedExample:
    """One SFT row: `labels_mask[i]` says whether token i is trained."""

    input_ids: list[int]
    labels_mask: list[bool]


@dataclass
class TokenizedPair:
    """One preference pair; each completion ends with the template's end-of-turn token."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_logps: tuple[float, float] | None = None  # reference (chosen, rejected), when precomputed


@dataclass
class TokenizedFeedback:
    """One unpaired completion; `kl_completion_ids` is another row's completion, scored
    after this prompt for KTO's KL estimate (set by `batching.with_kl_completions`)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    kl_completion_ids: list[int] | None = None


@dataclass
class TokenizeReport:
    """Counts of what tokenization changed; printed with every data load."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    retokenized_at_boundary: int = 0

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.rows} rows kept", f"{self.truncated} truncated"]
        parts += [f"{n} dropped ({why})" for why, n in self.dropped.items()]
        if self.retokenized_at_boundary:
            parts.append(f"{self.retokenized_at_boundary} re-tokenized at the prompt boundary")
        return ", ".join(parts)


class Dropped(Exception):
    """An example that cannot be kept under the current settings."""


def plan_truncation(
    prompt_len: int, completion_len: int, max_length: int, max_prompt_length: int, policy: str
) -> tuple[int, int] | None:
    """How many prompt tokens (kept from the end) and completion tokens (kept from the start)
    survive, or None to drop the example.

    Nothing is cut when prompt + completion fits in `max_length`. Otherwise `drop` drops
    it, and `truncate_prompt_left` keeps as much of the prompt's end as leaves room for the
    whole completion, but never less than `max_prompt_length` tokens of it; the completion
    is then cut to what is left.
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


def prompt_limit(cfg: DataConfig) -> int:
    """The prompt tokens kept at least when truncating (half of max_length unless set)."""
    return cfg.max_length // 2 if cfg.max_prompt_length is None else cfg.max_prompt_length


def encode_with_spans(
    text: str, spans: list[tuple[int, int]], tokenizer: Any
) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """Token ids, whether each token overlaps a span, and each token's character offsets."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    mask = [any(s < end and e > start for start, end in spans) for s, e in offsets]
    return list(encoded["input_ids"]), mask, offsets


def tokenize_conversation(
    conv: Conversation, tokenizer: Any, template: ChatTemplate, cfg: DataConfig
) -> tuple[TokenizedExample, bool]:
    """Token ids and loss mask for an SFT conversation, cut after its last assistant turn.

    Returns the example and whether it was truncated; raises `Dropped` to drop it.
    """
    text, spans = assistant_spans(conv.messages, template, tokenizer)
    ids, mask, offsets = encode_with_spans(text[: spans[-1][1]], spans, tokenizer)
    if cfg.train_on_prompt:
        mask = [True] * len(ids)
    last = next(i for i, (_, end) in enumerate(offsets) if end > spans[-1][0])
    plan = plan_truncation(last, len(ids) - last, cfg.max_length, prompt_limit(cfg), cfg.truncation)
    if plan is None:
        raise Dropped("longer than max_length")
    keep_prompt, keep_completion = plan
    window = slice(last - keep_prompt, last + keep_completion)
    return TokenizedExample(ids[window], mask[window]), (keep_prompt, keep_completion) != (
        last,
        len(ids) - last,
    )


def encode_completion(
    prompt: list[Message],
    prompt_text: str,
    prompt_ids: list[int],
    completion: list[Message],
    template: ChatTemplate,
    tokenizer: Any,
) -> tuple[list[int], bool]:
    """Completion ids that follow `prompt_ids`, ending with the end-of-turn token.

    Returns the ids and whether the joint tokenization had to be split at the boundary.
    """
    text, spans = assistant_spans(prompt + completion, template, tokenizer)
    text = text[: spans[-1][1]]
    if not text.startswith(prompt_text):
        raise AlignkitError(
            f"Chat template '{template.name}' renders the prompt differently when a completion "
            "follows it; pick another template with --chat-template."
        )
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    if full[: len(prompt_ids)] == prompt_ids:
        return list(full[len(prompt_ids) :]), False
    return list(tokenizer(text[len(prompt_text) :], add_special_tokens=False)["input_ids"]), True


def check_completion(ids: list[int], eot_id: int, turns: int) -> None:
    """The end-of-turn token closes the completion and appears once per assistant turn."""
    if not ids or ids[-1] != eot_id or ids.count(eot_id) != turns:
        raise Dropped("end-of-turn marker inside the text")


def tokenize_pair(
    pair: PreferencePair, tokenizer: Any, template: ChatTemplate, cfg: DataConfig
) -> tuple[TokenizedPair, bool, bool]:
    """Returns the pair, whether it was truncated, and whether it was re-tokenized at the boundary."""
    prompt_text = render(pair.prompt, template, tokenizer, add_generation_prompt=True)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    eot_id = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    completions, split = [], False
    for completion in (pair.chosen, pair.rejected):
        ids, was_split = encode_completion(
            pair.prompt, prompt_text, prompt_ids, completion, template, tokenizer
        )
        check_completion(ids, eot_id, sum(m["role"] == "assistant" for m in completion))
        completions.append(ids)
        split |= was_split
    longest = max(map(len, completions))
    plan = plan_truncation(
        len(prompt_ids), longest, cfg.max_length, prompt_limit(cfg), cfg.truncation
    )
    if plan is None:
        raise Dropped("longer than max_length")
    keep_prompt, keep_completion = plan
    tokenized = TokenizedPair(
        prompt_ids[len(prompt_ids) - keep_prompt :],
        completions[0][:keep_completion],
        completions[1][:keep_completion],
    )
    return tokenized, (keep_prompt, keep_completion) != (len(prompt_ids), longest), split


def tokenize_feedback(
    item: Feedback, tokenizer: Any, template: ChatTemplate, cfg: DataConfig
) -> tuple[TokenizedFeedback, bool, bool]:
    as_pair = PreferencePair(item.prompt, item.completion, item.completion)
    tokenized, truncated, split = tokenize_pair(as_pair, tokenizer, template, cfg)
    return (
        TokenizedFeedback(tokenized.prompt_ids, tokenized.chosen_ids, item.label),
        truncated,
        split,
    )


def check_prompt_limit(cfg: DataConfig) -> None:
    """The prompt's share of max_length leaves room for a completion."""
    if prompt_limit(cfg) >= cfg.max_length:
        raise AlignkitError(
            f"data.max_prompt_length ({cfg.max_prompt_length}) must be below data.max_length "
            f"({cfg.max_length}) to leave room for the completion."
        )


def tokenize_examples(
    examples: list[Example], tokenizer: Any, template: ChatTemplate, cfg: DataConfig
) -> tuple[list[Any], TokenizeReport]:
    """Tokenize a list of canonical examples of one kind, counting every change."""
    check_prompt_limit(cfg)
    report = TokenizeReport(rows=len(examples))
    out = []
    for example in examples:
        try:
            if isinstance(example, Conversation):
                item, truncated = tokenize_conversation(example, tokenizer, template, cfg)
                split = False
            elif isinstance(example, PreferencePair):
                item, truncated, split = tokenize_pair(example, tokenizer, template, cfg)
            else:
                item, truncated, split = tokenize_feedback(example, tokenizer, template, cfg)
        except Dropped as why:
            report.dropped[str(why)] += 1
            continue
        report.truncated += truncated
        report.retokenized_at_boundary += split
        out.append(item)
    report.kept = len(out)
    return out, report

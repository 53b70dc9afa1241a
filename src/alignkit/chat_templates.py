"""Chat templates and the assistant-span logic that decides which tokens are trained.

Every template, built-in or the tokenizer's own, is a Jinja string rendered by
`tokenizer.apply_chat_template` (or, for the many prefixes of one conversation, exactly as
it does by `prefix_renderer`). A template's own `{% generation %}` blocks say which
characters are trained. Otherwise each assistant turn k is trained in the context the
template generates it from: turns [0, k) rendered with a generation prompt, followed by
turn k as the template renders it. Turns share one text while each extends the one
before; a template that re-renders earlier turns (Qwen3 drops old `<think>` blocks,
Mistral moves the system prompt to the last user turn) gives one text per turn. Every
trained turn ends just after its end-of-turn marker, so the model learns to stop but not
whatever separator follows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.data.formats import Message
from alignkit.errors import AlignkitError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system %}{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

HUMAN_ASSISTANT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Human: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Assistant: ' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\n\n' }}{% set turns = messages[1:] %}"
    "{% else %}{{ '" + ALPACA_PREAMBLE + "\n\n' }}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama2": LLAMA2,
    "human_assistant": HUMAN_ASSISTANT,
    "alpaca": ALPACA,
}


@dataclass(frozen=True)
class ChatTemplate:
    """A named Jinja chat template and the text that ends each assistant turn."""

    name: str
    source: str
    end_of_turn: str
    added_tokens: tuple[str, ...] = ()  # special tokens added to the tokenizer for it


def resolve_template(spec: str | None, tokenizer: Any) -> ChatTemplate:
    """The template named by `spec` (built-in name or .jinja path), else the tokenizer's own.

    Turn markers the template writes (`<|im_end|>`, `<end_of_turn>`) that the tokenizer
    lacks are added as special tokens, so each is one token the model can learn to emit.
    """
    if spec in (None, "", "auto"):
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise AlignkitError(
                "The tokenizer has no chat template of its own. Pass --chat-template with one of "
                f"{', '.join(BUILTIN_TEMPLATES)} or a .jinja file."
            )
        name = "tokenizer"
    elif spec in BUILTIN_TEMPLATES:
        source, name = BUILTIN_TEMPLATES[spec], spec
    elif str(spec).endswith(".jinja"):
        path = Path(spec)
        if not path.is_file():
            raise AlignkitError(f"Chat template file '{spec}' does not exist.")
        source, name = path.read_text(encoding="utf-8"), path.stem
    else:
        raise AlignkitError(
            f"Unknown chat template '{spec}'. Use one of {', '.join(BUILTIN_TEMPLATES)}, "
            "a path to a .jinja file, or leave it empty for the tokenizer's own."
        )
    added = _ensure_special_tokens(tokenizer, template_markers(source, tokenizer))
    return ChatTemplate(
        name=name,
        source=source,
        end_of_turn=_find_end_of_turn(source, tokenizer),
        added_tokens=tuple(added),
    )


# turn markers as chat templates write them: <|im_end|>, <|eot_id|>, <end_of_turn>
MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>|<[a-z]+(?:_[a-z]+)+>")


def template_markers(source: str, tokenizer: Any) -> list[str]:
    """The marker-shaped strings the template writes around a probe conversation."""
    return list(dict.fromkeys(MARKER.findall(probe_text(source, tokenizer))))


def generation_template(spec: str | None, tokenizer: Any, model: str) -> ChatTemplate:
    """The template for generating with (chat, serve, eval): as `resolve_template`, but
    one whose markers had to be added to the tokenizer is refused, as it asks `model`
    for tokens it was never trained on."""
    template = resolve_template(spec, tokenizer)
    if template.added_tokens:
        raise AlignkitError(
            f"Chat template '{template.name}' writes {', '.join(template.added_tokens)}, which "
            f"the tokenizer of '{model}' does not have, so the model was never trained on "
            "them. Leave --chat-template empty for the model's own template, or train with "
            "this one first (alignkit sft adds and trains those tokens)."
        )
    return template


def _ensure_special_tokens(tokenizer: Any, tokens: list[str]) -> list[str]:
    """Add the `tokens` the tokenizer lacks as special tokens; returns those added (the
    model's embeddings must grow and train them: see alignkit.models.NewTokens)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return missing


def render(
    messages: list[Message],
    template: ChatTemplate,
    tokenizer: Any,
    add_generation_prompt: bool,
) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template.source,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


PrefixRender = Callable[[int, bool], str]


def prefix_renderer(
    messages: list[Message], template: ChatTemplate, tokenizer: Any
) -> PrefixRender:
    """`render` of `messages[:k]` as a function of (k, add_generation_prompt), for rendering
    many prefixes of one conversation.

    It renders exactly as `tokenizer.apply_chat_template` does (transformers' cached
    compiled template, with the same messages and variables: the special tokens, no tools
    or documents), but converts the messages to the template's plain data once per
    conversation instead of once per prefix. Where transformers lacks those helpers, or
    for an empty prefix (which it refuses), it calls `render`.
    """
    try:
        from transformers.utils.chat_template_utils import (
            _alias_reasoning_fields,
            _compile_jinja_template,
            _plain_template_data,
        )
    except ImportError:  # another transformers: render each prefix the public way
        return lambda k, generation: render(messages[:k], template, tokenizer, generation)
    compiled = _compile_jinja_template(template.source)
    variables = _plain_template_data(dict(tokenizer.special_tokens_map))
    # apply_chat_template drops None values; each message is converted on its own, so
    # converting the whole conversation and slicing gives every prefix's messages
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    chat = _alias_reasoning_fields(_plain_template_data(chat))

    def render_prefix(k: int, add_generation_prompt: bool) -> str:
        if k == 0:
            return render(messages[:k], template, tokenizer, add_generation_prompt)
        return compiled.render(
            messages=chat[:k],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    return render_prefix


_PROBE_REPLY = "PROBE-REPLY-7f3a"


def probe_text(source: str, tokenizer: Any) -> str:
    """The template's rendering of a one-question conversation with a known reply."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    return tokenizer.apply_chat_template(probe, chat_template=source, tokenize=False)


def _find_end_of_turn(source: str, tokenizer: Any) -> str:
    """The special token that closes an assistant turn, found by rendering a probe turn."""
    text = probe_text(source, tokenizer)
    after = text[text.index(_PROBE_REPLY) + len(_PROBE_REPLY) :]
    specials = set(tokenizer.all_special_tokens) | set(
        getattr(tokenizer, "added_tokens_encoder", {})
    )
    found = [(after.find(tok), tok) for tok in specials if tok and after.find(tok) >= 0]
    if not found:
        raise AlignkitError(
            "The chat template does not close assistant turns with a special token (such as "
            "<|im_end|> or the EOS token), so a trained model could not learn to stop. Pass "
            f"--chat-template with one of {', '.join(BUILTIN_TEMPLATES)}."
        )
    return min(found)[1]


@dataclass(frozen=True)
class Rendering:
    """A text to train on and the [start, end) characters of the assistant turns trained in it.

    `turns[i]` is the message index of the turn `spans[i]` covers; the text ends with the
    last span, whose end-of-turn marker is included.
    """

    text: str
    spans: list[tuple[int, int]]
    turns: list[int]


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def assistant_renderings(
    messages: list[Message], template: ChatTemplate, tokenizer: Any
) -> list[Rendering]:
    """The texts that train the conversation's assistant turns, in order.

    A template with `{% generation %}` blocks gives one rendering trained where it marks.
    Otherwise each turn is rendered in the context the template generates it from; a turn
    whose text extends the previous rendering joins it, else it starts a new one (a
    template that re-renders earlier turns, such as Qwen3 dropping old `<think>` blocks,
    gives one rendering per turn).
    """
    if GENERATION_BLOCK.search(template.source):
        return [_marked_rendering(messages, template, tokenizer)]
    renderings: list[Rendering] = []
    render_prefix = prefix_renderer(messages, template, tokenizer)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        text, start = _turn_text(messages, k, template, render_prefix)
        if renderings and text.startswith(renderings[-1].text):
            last = renderings.pop()
            renderings.append(Rendering(text, [*last.spans, (start, len(text))], [*last.turns, k]))
        else:
            renderings.append(Rendering(text, [(start, len(text))], [k]))
    return renderings


def completion_rendering(
    prompt: list[Message], completion: list[Message], template: ChatTemplate, tokenizer: Any
) -> Rendering:
    """The rendering that ends with the completion's last turn, trained on the completion's
    assistant turns only: earlier turns and the completion's user turns are context."""
    last = assistant_renderings(prompt + completion, template, tokenizer)[-1]
    kept = [(span, k) for span, k in zip(last.spans, last.turns, strict=True) if k >= len(prompt)]
    return Rendering(last.text, [span for span, _ in kept], [k for _, k in kept])


def shared_prompt(
    prompt: list[Message], branches: list[Rendering], template: ChatTemplate, tokenizer: Any
) -> str:
    """The prompt text every branch continues: the prompt rendered for generation, as far as
    each branch renders the same text before its first trained character."""
    generation = render(prompt, template, tokenizer, add_generation_prompt=True)
    return os.path.commonprefix([generation, *(b.text[: b.spans[0][0]] for b in branches)])


def protected_head(
    messages: list[Message], text: str, template: ChatTemplate, tokenizer: Any
) -> int:
    """How many leading characters of `text` (a rendering of `messages`) left truncation
    keeps: the BOS token and the conversation's system turn, up to where the first user
    text begins. A default system prompt that a template renders for a conversation
    without one is not kept.
    """
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    if not any(m["role"] == "system" for m in messages[:first_user]):
        bos = tokenizer.bos_token
        return len(bos) if bos and text.startswith(bos) else 0
    probes = [
        render(
            [*messages[:first_user], {"role": "user", "content": marker + _PROBE_REPLY}],
            template,
            tokenizer,
            add_generation_prompt=True,
        )
        for marker in "AB"
    ]
    return len(os.path.commonprefix([*probes, text]))


def _turn_text(
    messages: list[Message], k: int, template: ChatTemplate, render_prefix: PrefixRender
) -> tuple[str, int]:
    """Turn k after the context the template generates it from: (context + reply, where the
    reply starts). The context is the conversation so far rendered with a generation prompt;
    the reply is the turn as the template renders it, up to its end-of-turn marker."""
    before = render_prefix(k, True)
    upto = render_prefix(k + 1, False)
    start = len(before) if upto.startswith(before) else _reply_start(before, upto, messages[:k])
    if start is None:
        raise AlignkitError(
            f"Chat template '{template.name}' does not render turn {k} after the text it gives "
            "the earlier turns, so the assistant tokens cannot be located. Pass --chat-template "
            f"with one of {', '.join(BUILTIN_TEMPLATES)}."
        )
    end = _end_of_assistant(upto, start, messages[k]["content"], template)
    return before + upto[start:end], len(before)


def _reply_start(before: str, upto: str, context: list[Message]) -> int | None:
    """Where the reply starts in `upto` when the template renders the context differently
    once a reply follows (Mistral moves the system prompt into the last user turn only
    while that turn is last): just after the last context message's text and whatever
    the generation prompt puts after it."""
    content = context[-1]["content"].strip() if context else ""
    at = before.rfind(content) if content else -1
    if at < 0:
        return None
    anchor = before[at:]
    found = upto.rfind(anchor)
    return None if found < 0 else found + len(anchor)


def _end_of_assistant(upto: str, start: int, content: str, template: ChatTemplate) -> int:
    content_at = upto.find(content.strip(), start) if content.strip() else start
    search_from = content_at + len(content.strip()) if content_at >= 0 else start
    eot_at = upto.find(template.end_of_turn, search_from)
    return eot_at + len(template.end_of_turn) if eot_at >= 0 else len(upto)


def _marked_rendering(messages: list[Message], template: ChatTemplate, tokenizer: Any) -> Rendering:
    """One rendering trained where the template's `{% generation %}` blocks are (transformers'
    assistant mask), each block cut just after its end-of-turn marker."""
    text = render(messages, template, tokenizer, add_generation_prompt=False)
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=template.source,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        tokenizer_kwargs={"return_offsets_mapping": True},
    )
    blocks = _mask_runs(out["assistant_masks"], out["offset_mapping"])
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if len(blocks) != len(turns):
        raise AlignkitError(
            f"Chat template '{template.name}' marks {len(blocks)} generation blocks for "
            f"{len(turns)} assistant turns; mark each assistant turn with one "
            "{% generation %} ... {% endgeneration %} block."
        )
    spans = [_cut_after_end_of_turn(text, span, template) for span in blocks]
    return Rendering(text[: spans[-1][1]], spans, turns)


def _mask_runs(mask: list[int], offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The [start, end) characters of each run of masked tokens."""
    runs: list[tuple[int, int]] = []
    for i, (flag, (start, end)) in enumerate(zip(mask, offsets, strict=True)):
        if flag and i > 0 and mask[i - 1]:
            runs[-1] = (runs[-1][0], end)
        elif flag:
            runs.append((start, end))
    return runs


def _cut_after_end_of_turn(
    text: str, span: tuple[int, int], template: ChatTemplate
) -> tuple[int, int]:
    eot_at = text.rfind(template.end_of_turn, *span)
    if eot_at < 0:
        raise AlignkitError(
            f"The {{% generation %}} blocks of chat template '{template.name}' leave out the "
            f"end-of-turn marker {template.end_of_turn}, so a trained model could not learn to "
            "stop; put the marker inside the block."
        )
    return span[0], eot_at + len(template.end_of_turn)

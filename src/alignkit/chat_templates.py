"""Chat templates and the assistant-span logic that decides which tokens are trained.

Every template, built-in or the tokenizer's own, is a Jinja string rendered by
`tokenizer.apply_chat_template`. Which characters belong to an assistant turn is found
by rendering the conversation incrementally: the text for turns [0, k) with a
generation prompt must be a prefix of the text for turns [0, k]; the difference is
turn k's assistant text, trimmed just after its end-of-turn marker so the model
learns to stop but not whatever separator follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    The `chatml` built-in also registers its markers as special tokens when the
    tokenizer lacks them, so `<|im_end|>` is one token the model can learn to emit.
    """
    added: list[str] = []
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
        if spec == "chatml":
            added = _ensure_special_tokens(tokenizer, ["<|im_start|>", "<|im_end|>"])
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
    return ChatTemplate(
        name=name,
        source=source,
        end_of_turn=_find_end_of_turn(source, tokenizer),
        added_tokens=tuple(added),
    )


def _ensure_special_tokens(tokenizer: Any, tokens: list[str]) -> list[str]:
    """Add the `tokens` the tokenizer lacks as special tokens; returns those added (the
    model's embeddings must grow and train them: see alignkit.models.NewTokens)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return missing


def render(
    messages: list[dict[str, str]],
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


_PROBE_REPLY = "PROBE-REPLY-7f3a"


def _find_end_of_turn(source: str, tokenizer: Any) -> str:
    """The special token that closes an assistant turn, found by rendering a probe turn."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    text = tokenizer.apply_chat_template(probe, chat_template=source, tokenize=False)
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


def assistant_spans(
    messages: list[dict[str, str]], template: ChatTemplate, tokenizer: Any
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return its text and the [start, end) characters of each
    assistant turn, end-of-turn marker included."""
    text = render(messages, template, tokenizer, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:k], template, tokenizer, add_generation_prompt=True)
        upto = render(messages[: k + 1], template, tokenizer, add_generation_prompt=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise AlignkitError(
                f"Chat template '{template.name}' does not render turn {k} as an extension of the "
                "earlier turns, so the assistant tokens cannot be located. Pass --chat-template "
                f"with one of {', '.join(BUILTIN_TEMPLATES)}."
            )
        spans.append(
            (len(before), _end_of_assistant(upto, len(before), message["content"], template))
        )
    return text, spans


def _end_of_assistant(upto: str, start: int, content: str, template: ChatTemplate) -> int:
    content_at = upto.find(content.strip(), start) if content.strip() else start
    search_from = content_at + len(content.strip()) if content_at >= 0 else start
    eot_at = upto.find(template.end_of_turn, search_from)
    return eot_at + len(template.end_of_turn) if eot_at >= 0 else len(upto)

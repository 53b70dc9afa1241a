"""Source record formats -> canonical examples, one small adapter per format.

Canonical examples hold chat messages (`{"role", "content"}` dicts with roles
system/user/assistant; an assistant message may also carry its `reasoning_content`,
which templates such as Qwen3 render as a `<think>` block):
- `Conversation`: a whole chat for SFT; assistant turns are trained.
- `PreferencePair`: prompt messages + chosen and rejected completion messages.
- `Feedback`: prompt + one completion + a desirable/undesirable label (KTO).
An adapter raises `RowProblem` for a record it cannot use; the loader adds file and row.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Message = dict[str, str]
Kind = Literal["sft", "pair", "feedback"]


@dataclass(frozen=True)
class Conversation:
    messages: list[Message]


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


@dataclass(frozen=True)
class Feedback:
    prompt: list[Message]
    completion: list[Message]
    label: bool


Example = Conversation | PreferencePair | Feedback


class RowProblem(Exception):
    """A record that cannot be used. `skip` marks rows that are dropped with a count
    (empty text, identical chosen and rejected) rather than stopping the run."""

    def __init__(self, message: str, field: str | None = None, skip: bool = False):
        super().__init__(message)
        self.field = field
        self.skip = skip


@dataclass(frozen=True)
class Format:
    name: str
    kind: Kind
    fields: tuple[str, ...]
    convert: Callable[[dict[str, Any]], Example]
    example: str


ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}


def _field(record: dict[str, Any], name: str) -> Any:
    if name not in record or record[name] is None:
        raise RowProblem(f"missing field '{name}'", field=name)
    return record[name]


def _text(record: dict[str, Any], name: str) -> str:
    value = _field(record, name)
    if not isinstance(value, str):
        raise RowProblem(f"field '{name}' must be a string, got {type(value).__name__}", field=name)
    return value


def _optional_text(record: dict[str, Any], name: str) -> str:
    """A text field that may be absent or null (then empty)."""
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowProblem(f"field '{name}' must be a string, got {type(value).__name__}", field=name)
    return value


def _history(record: dict[str, Any]) -> list[Message]:
    """Alpaca `history`: earlier [user, assistant] text pairs."""
    turns = record.get("history") or []
    ok = isinstance(turns, list) and all(
        isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t)
        for t in turns
    )
    if not ok:
        raise RowProblem(
            "field 'history' must be a list of [user text, assistant text] pairs", field="history"
        )
    messages: list[Message] = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def _message(item: Any, field: str, role_key: str = "role", text_key: str = "content") -> Message:
    if not isinstance(item, dict) or role_key not in item or text_key not in item:
        raise RowProblem(
            f"each item of '{field}' must be an object with '{role_key}' and '{text_key}'",
            field=field,
        )
    role = ROLE_ALIASES.get(str(item[role_key]).lower())
    if role is None:
        raise RowProblem(
            f"unknown role '{item[role_key]}' in '{field}'; known: {', '.join(sorted(ROLE_ALIASES))}",
            field=field,
        )
    content = item[text_key]
    if not isinstance(content, str):
        raise RowProblem(f"message text in '{field}' must be a string", field=field)
    message = {"role": role, "content": content}
    reasoning = item.get("reasoning_content") if role == "assistant" else None
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise RowProblem(
                f"'reasoning_content' of an assistant message in '{field}' must be a string, "
                f"got {type(reasoning).__name__}",
                field=field,
            )
        message["reasoning_content"] = reasoning
    return message


def _messages(
    value: Any, field: str, role_key: str = "role", text_key: str = "content"
) -> list[Message]:
    if not isinstance(value, list):
        raise RowProblem(f"field '{field}' must be a list of messages", field=field)
    return [_message(item, field, role_key, text_key) for item in value]


def _as_messages(value: Any, field: str, default_role: str) -> list[Message]:
    """A plain string becomes one message; a list is read as messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    return _messages(value, field)


def _require_text(messages: list[Message], field: str) -> None:
    if not messages or any(not m["content"].strip() for m in messages):
        raise RowProblem(f"empty text in '{field}'", field=field, skip=True)


def _conversation(messages: list[Message], field: str) -> Conversation:
    _require_text(messages, field)
    if messages[-1]["role"] != "assistant":
        raise RowProblem(f"the last message of '{field}' must be from the assistant", field=field)
    if not any(m["role"] == "user" for m in messages):
        raise RowProblem(f"'{field}' has no user message", field=field)
    first = next(m for m in messages if m["role"] != "system")
    if first["role"] != "user":
        raise RowProblem(
            f"'{field}' must begin with a user turn (after any system message), not an "
            f"{first['role']} turn",
            field=field,
        )
    return Conversation(messages)


def _pair(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> PreferencePair:
    _require_text(prompt, "prompt")
    _require_text(chosen, "chosen")
    _require_text(rejected, "rejected")
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if completion[-1]["role"] != "assistant":
            raise RowProblem(f"'{name}' must end with an assistant message", field=name)
    if chosen == rejected:
        raise RowProblem("chosen and rejected are identical", field="chosen", skip=True)
    return PreferencePair(prompt, chosen, rejected)


# ---------------------------------------------------------------- adapters


def from_alpaca(record: dict[str, Any]) -> Conversation:
    instruction = _text(record, "instruction")
    extra = _optional_text(record, "input")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages: list[Message] = []
    if (system := _optional_text(record, "system")).strip():
        messages.append({"role": "system", "content": system})
    messages += _history(record)
    messages += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text(record, "output")},
    ]
    return _conversation(messages, "output")


def from_sharegpt(record: dict[str, Any]) -> Conversation:
    turns = _field(record, "conversations")
    if not isinstance(turns, list):
        raise RowProblem("field 'conversations' must be a list of messages", field="conversations")
    keys = (
        ("role", "content")
        if turns and isinstance(turns[0], dict) and "role" in turns[0]
        else ("from", "value")
    )
    return _conversation(_messages(turns, "conversations", *keys), "conversations")


def from_messages(record: dict[str, Any]) -> Conversation:
    return _conversation(_messages(_field(record, "messages"), "messages"), "messages")


def from_prompt_completion(record: dict[str, Any]) -> Conversation:
    prompt = _as_messages(_field(record, "prompt"), "prompt", "user")
    completion = _as_messages(_field(record, "completion"), "completion", "assistant")
    _require_text(prompt, "prompt")
    return _conversation(prompt + completion, "completion")


def _strip_prompt(prompt: list[Message], completion: list[Message]) -> list[Message]:
    """UltraFeedback-binarized style: chosen/rejected hold the whole conversation."""
    return completion[len(prompt) :] if completion[: len(prompt)] == prompt else completion


def from_preference(record: dict[str, Any]) -> PreferencePair:
    prompt = _as_messages(_field(record, "prompt"), "prompt", "user")
    chosen = _as_messages(_field(record, "chosen"), "chosen", "assistant")
    rejected = _as_messages(_field(record, "rejected"), "rejected", "assistant")
    return _pair(prompt, _strip_prompt(prompt, chosen), _strip_prompt(prompt, rejected))


def from_orca_dpo(record: dict[str, Any]) -> PreferencePair:
    prompt: list[Message] = []
    if (system := _optional_text(record, "system")).strip():
        prompt.append({"role": "system", "content": system})
    prompt.append({"role": "user", "content": _text(record, "question")})
    chosen = [{"role": "assistant", "content": _text(record, "chosen")}]
    rejected = [{"role": "assistant", "content": _text(record, "rejected")}]
    return _pair(prompt, chosen, rejected)


HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh(text: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> messages (the text before the first marker is dropped)."""
    parts = HH_TURN.split(text)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [
        {"role": roles[parts[i]], "content": parts[i + 1].strip()}
        for i in range(1, len(parts) - 1, 2)
    ]


def from_hh_rlhf(record: dict[str, Any]) -> PreferencePair:
    chosen_text, rejected_text = _text(record, "chosen"), _text(record, "rejected")
    chosen, rejected = parse_hh(chosen_text), parse_hh(rejected_text)
    if not chosen or not rejected:
        raise RowProblem("no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found", field="chosen")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return _pair(chosen[:shared], chosen[shared:], rejected[shared:])


def from_sharegpt_pair(record: dict[str, Any]) -> PreferencePair:
    prompt = _messages(_field(record, "conversations"), "conversations", "from", "value")
    chosen = [_message(_field(record, "chosen"), "chosen", "from", "value")]
    rejected = [_message(_field(record, "rejected"), "rejected", "from", "value")]
    return _pair(prompt, chosen, rejected)


def from_feedback(record: dict[str, Any]) -> Feedback:
    label = _field(record, "label")
    if not isinstance(label, bool):
        raise RowProblem("field 'label' must be true or false", field="label")
    messages = _messages(_field(record, "messages"), "messages")
    _require_text(messages, "messages")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise RowProblem(
            "'messages' must end with the assistant completion being rated", field="messages"
        )
    return Feedback(messages[:-1], messages[-1:], label)


# Detection order matters: a format is chosen when its fields are all present, and the
# more specific layouts (pairs, labelled feedback) are tried before the general ones.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format(
            "sharegpt_pair",
            "pair",
            ("conversations", "chosen", "rejected"),
            from_sharegpt_pair,
            '{"conversations": [{"from": "human", "value": ...}], "chosen": {"from": "gpt", "value": ...}, "rejected": {...}}',
        ),
        Format(
            "feedback",
            "feedback",
            ("messages", "label"),
            from_feedback,
            '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "label": true}',
        ),
        Format(
            "orca_dpo",
            "pair",
            ("question", "chosen", "rejected"),
            from_orca_dpo,
            '{"system": ..., "question": ..., "chosen": ..., "rejected": ...}',
        ),
        Format(
            "preference",
            "pair",
            ("prompt", "chosen", "rejected"),
            from_preference,
            '{"prompt": ..., "chosen": ..., "rejected": ...} (strings or message lists)',
        ),
        Format(
            "hh_rlhf",
            "pair",
            ("chosen", "rejected"),
            from_hh_rlhf,
            '{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}',
        ),
        Format(
            "alpaca",
            "sft",
            ("instruction", "output"),
            from_alpaca,
            '{"instruction": ..., "input": ..., "output": ...}',
        ),
        Format(
            "sharegpt",
            "sft",
            ("conversations",),
            from_sharegpt,
            '{"conversations": [{"from": "system|human|gpt", "value": ...}]}',
        ),
        Format(
            "messages",
            "sft",
            ("messages",),
            from_messages,
            '{"messages": [{"role": "system|user|assistant", "content": ...}]}',
        ),
        Format(
            "prompt_completion",
            "sft",
            ("prompt", "completion"),
            from_prompt_completion,
            '{"prompt": ..., "completion": ...}',
        ),
    ]
}


def detect_format(record: dict[str, Any]) -> Format | None:
    for fmt in FORMATS.values():
        if all(name in record for name in fmt.fields):
            return fmt
    return None


def formats_help() -> str:
    return "\n".join(f"  {f.name} ({f.kind}): {f.example}" for f in FORMATS.values())

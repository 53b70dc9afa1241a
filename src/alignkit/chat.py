"""`alignkit chat`: talk to a model through its chat template, one-shot or interactively."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from alignkit.chat_templates import ChatTemplate, generation_template
from alignkit.config import GenerationConfig, Recipe
from alignkit.data.formats import Message
from alignkit.generate import generate_reply
from alignkit.models import load_model, load_tokenizer

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /exit"


def text_streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    """A transformers streamer that hands each newly decoded piece of the reply to `on_text`."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@dataclass
class ChatSession:
    """A conversation with one loaded model: history, system message, generation options."""

    model: Any
    tokenizer: Any
    template: ChatTemplate
    cfg: GenerationConfig
    system: str | None = None
    history: list[Message] = field(default_factory=list)

    def messages(self) -> list[Message]:
        system: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer `text` in the context of the history (streamed to `on_text`) and remember both."""
        self.history.append({"role": "user", "content": text})
        streamer = text_streamer(self.tokenizer, on_text) if on_text else None
        # a new seed per turn, so sampled turns differ but a session replays identically
        cfg = replace(self.cfg, seed=self.cfg.seed + len(self.history))
        answer = generate_reply(
            self.model, self.tokenizer, self.template, self.messages(), cfg, streamer
        )
        self.history.append({"role": "assistant", "content": answer})
        return answer


def open_session(recipe: Recipe, system: str | None = None) -> ChatSession:
    tokenizer = load_tokenizer(recipe.model)
    template = generation_template(recipe.model.chat_template, tokenizer, recipe.model.name_or_path)
    model = load_model(recipe.model).eval()
    return ChatSession(model, tokenizer, template, recipe.generation, system)


def handle_command(session: ChatSession, line: str, write: Callable[[str], None]) -> bool:
    """Carry out a /command; returns False when the chat should end."""
    command, _, arg = line.partition(" ")
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        session.history.clear()
        write("(conversation cleared)\n")
    elif command == "/system":
        session.system = arg.strip() or None
        session.history.clear()
        write(f"(system message {'set' if session.system else 'removed'}; conversation cleared)\n")
    else:
        write(f"unknown command {command}; {HELP}\n")
    return True


def run_repl(
    session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]
) -> None:
    """Read user lines until /exit or end of input; stream each answer as it is generated."""
    write(f"Chatting with the model; {HELP}\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            if not handle_command(session, line, write):
                return
            continue
        write("assistant> ")
        session.reply(line, on_text=write)
        write("\n")

"""What the server accepts: OpenAI-shaped requests, validated completely before any work.

Every text field must be encodable as UTF-8 (a lone surrogate such as `\\ud800` is
refused), a seed is a 64-bit unsigned integer, a completion prompt is not empty, and
message content is a string or a list of text parts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text holds an unpaired surrogate; send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(utf8)]
MAX_SEED = 2**64 - 1


class ApiError(Exception):
    """An error with an HTTP status, answered as OpenAI-shaped JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; as vLLM and llama.cpp take it
    stop: Text | list[Text] | None = None
    n: int = 1
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text: a string, or its text parts joined (other parts refused)."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text":
                raise ApiError(
                    400,
                    f"Content part {i} has type '{part.get('type')}'; this server takes text "
                    "parts only.",
                    "messages",
                    "unsupported_content",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ApiError(400, f"Content part {i} has no text.", "messages", "invalid_value")
            try:
                texts.append(utf8(text))
            except ValueError as exc:
                raise ApiError(400, f"Content part {i}: {exc}.", "messages") from None
        return "".join(texts)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: Annotated[Text, Field(min_length=1)] | list[Annotated[Text, Field(min_length=1)]]

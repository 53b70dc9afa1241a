"""`alignkit serve`: an OpenAI-compatible HTTP API over one loaded model.

Concurrency: requests are queued on a single generation worker (a one-thread executor,
first in first out), so one generation runs at a time and none shares state with
another; HTTP handling stays concurrent. Needs the `serve` extra (fastapi, uvicorn). Bad requests get OpenAI-shaped JSON errors
(`{"error": {"message", "type", "param", "code"}}`) with a 4xx status.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from alignkit.chat import text_streamer
from alignkit.chat_templates import ChatTemplate
from alignkit.config import GenerationConfig
from alignkit.generate import generate_ids, prompt_ids, stop_token_ids


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------- request schemas


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int = 1
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


# ---------------------------------------------------------------- the engine


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


@dataclass
class StopTrimmer:
    """Streams text while holding back what could still turn into a stop string."""

    stops: list[str]
    text: str = ""
    sent: int = 0
    stopped: bool = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut, self.stopped = cut_at_stop(self.text, self.stops)
        hold = 0 if self.stopped else max((len(s) - 1 for s in self.stops), default=0)
        return self._emit(len(cut) - hold)

    def flush(self) -> str:
        return self._emit(len(cut_at_stop(self.text, self.stops)[0]))

    def _emit(self, end: int) -> str:
        out = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out


def completion_stop(tokenizer: Any, prompt_len: int, stops: list[str]) -> Any:
    """Stop once a stop string appears in the generated text.

    transformers' own `stop_strings` also match across the prompt's last tokens (a prompt
    ending in a newline plus two generated ones matches a three-newline stop); here only
    the completion counts.
    """
    from transformers import StoppingCriteria

    class CompletionStop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            text = tokenizer.decode(input_ids[0, prompt_len:], skip_special_tokens=True)
            hit = any(s in text for s in stops)
            return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)

    return CompletionStop()


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class Engine:
    model: Any
    tokenizer: Any
    template: ChatTemplate
    name: str
    context_length: int
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        as_dicts = [{"role": m.role, "content": m.content} for m in messages]
        return prompt_ids(as_dicts, self.template, self.tokenizer)

    def text_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def budget(self, request: Sampling, prompt_ids: list[int]) -> int:
        """The new-token budget, or an error for limits a request breaks."""
        if request.n != 1:
            raise ApiError(400, "Only n=1 is supported.", "n", "invalid_value")
        if request.model not in (None, self.name):
            raise ApiError(
                404,
                f"The model '{request.model}' does not exist; this server has '{self.name}'.",
                "model",
                "model_not_found",
            )
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise ApiError(
                400,
                f"The prompt has {len(prompt_ids)} tokens; the model's context length is "
                f"{self.context_length}.",
                "messages",
                "context_length_exceeded",
            )
        asked = request.max_completion_tokens or request.max_tokens
        if asked is not None and asked > room:
            raise ApiError(
                400,
                f"max_tokens is {asked}, but the prompt ({len(prompt_ids)} tokens) leaves "
                f"room for {room} in the context of {self.context_length}.",
                "max_tokens",
                "context_length_exceeded",
            )
        return asked or min(room, 512)

    def _generate(
        self, ids: list[int], request: Sampling, budget: int, on_text: Callable[[str], None] | None
    ) -> Generation:
        cfg = GenerationConfig(
            max_new_tokens=budget,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed or 0,
        )
        stops = request.stops()
        criteria = [completion_stop(self.tokenizer, len(ids), stops)] if stops else None
        streamer = text_streamer(self.tokenizer, on_text) if on_text else None
        out = generate_ids(self.model, self.tokenizer, self.template, ids, cfg, streamer, criteria)
        text, stopped = cut_at_stop(self.tokenizer.decode(out, skip_special_tokens=True), stops)
        end_ids = stop_token_ids(self.template, self.tokenizer)
        ended = stopped or (len(out) > 0 and int(out[-1]) in end_ids) or len(out) < budget
        return Generation(text, len(ids), len(out), "stop" if ended else "length")

    def generate(
        self,
        ids: list[int],
        request: Sampling,
        budget: int,
        on_text: Callable[[str], None] | None = None,
    ) -> Any:
        """Queue a generation on the single worker; returns its future."""
        return self.worker.submit(self._generate, ids, request, budget, on_text)


# ---------------------------------------------------------------- responses


def usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def chat_response(engine: Engine, gen: Generation) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": engine.name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": gen.text},
                "finish_reason": gen.finish_reason,
            }
        ],
        "usage": usage(gen),
    }


def completion_response(engine: Engine, gen: Generation) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": engine.name,
        "choices": [
            {"index": 0, "text": gen.text, "logprobs": None, "finish_reason": gen.finish_reason}
        ],
        "usage": usage(gen),
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def stream_events(
    engine: Engine,
    ids: list[int],
    request: Sampling,
    budget: int,
    chunk: Callable[[str | None, str | None], dict[str, Any]],
) -> Iterator[str]:
    """Server-sent events: text deltas as they are generated, a finish chunk, [DONE]."""
    pieces: queue.Queue = queue.Queue()
    future = engine.generate(ids, request, budget, on_text=pieces.put)
    future.add_done_callback(lambda _: pieces.put(None))
    trimmer = StopTrimmer(request.stops())
    while (piece := pieces.get()) is not None:
        if delta := trimmer.feed(piece):
            yield sse(chunk(delta, None))
    error = future.exception()
    if error is not None:
        yield sse(error_body(f"Generation failed: {error}", "server_error"))
        return
    gen: Generation = future.result()
    if tail := trimmer.flush():
        yield sse(chunk(tail, None))
    final = chunk(None, gen.finish_reason)
    if (request.stream_options or {}).get("include_usage"):
        final["usage"] = usage(gen)
    yield sse(final)
    yield "data: [DONE]\n\n"


def chat_chunker(engine: Engine) -> Callable[[str | None, str | None], dict[str, Any]]:
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
        content = {"role": "assistant", "content": delta} if delta is not None else {}
        return {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": engine.name,
            "choices": [{"index": 0, "delta": content, "finish_reason": finish}],
        }

    return chunk


def completion_chunker(engine: Engine) -> Callable[[str | None, str | None], dict[str, Any]]:
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": engine.name,
            "choices": [
                {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            ],
        }

    return chunk


# ---------------------------------------------------------------- the app


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="alignkit", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        kind = "authentication_error" if exc.status == 401 else "invalid_request_error"
        return JSONResponse(error_body(exc.message, kind, exc.param, exc.code), exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = first.get("msg", "Invalid request")
        if first.get("type") == "json_invalid":
            message = "The request body is not valid JSON."
        return JSONResponse(
            error_body(f"{message} ({where or 'body'})", "invalid_request_error", where), 400
        )

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), exc.status_code)

    def authorized(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError(
                401,
                "Missing or wrong API key: send Authorization: Bearer <key>.",
                code="invalid_api_key",
            )

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "alignkit"}],
        }

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    def chat(request: ChatRequest) -> Any:
        ids = engine.chat_ids(request.messages)
        budget = engine.budget(request, ids)
        if request.stream:
            events = stream_events(engine, ids, request, budget, chat_chunker(engine))
            return StreamingResponse(events, media_type="text/event-stream")
        return chat_response(engine, engine.generate(ids, request, budget).result())

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    def complete(request: CompletionRequest) -> Any:
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1:
            raise ApiError(400, "Send exactly one prompt per request.", "prompt", "invalid_value")
        ids = engine.text_ids(prompts[0])
        budget = engine.budget(request, ids)
        if request.stream:
            events = stream_events(engine, ids, request, budget, completion_chunker(engine))
            return StreamingResponse(events, media_type="text/event-stream")
        return completion_response(engine, engine.generate(ids, request, budget).result())

    return app


def load_engine(recipe: Any, name: str | None = None) -> Engine:
    from alignkit.chat_templates import resolve_template
    from alignkit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    template = resolve_template(recipe.model.chat_template, tokenizer)
    model = load_model(recipe.model).eval()
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    return Engine(model, tokenizer, template, name or recipe.model.name_or_path, context)


def serve(recipe: Any, host: str, port: int, api_key: str | None, name: str | None) -> None:
    import uvicorn

    uvicorn.run(
        create_app(load_engine(recipe, name), api_key), host=host, port=port, log_level="info"
    )

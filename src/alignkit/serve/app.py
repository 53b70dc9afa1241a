"""The HTTP API: OpenAI-compatible routes over the engine, errors as OpenAI-shaped JSON.

Handlers are async and never hold a worker thread while a generation waits or runs. A
non-streamed request polls for its client between waits and cancels its job when the
client is gone; a streamed one cancels when its stream is closed. An error before the
first streamed token is an HTTP error; a later one ends the stream with an error event
and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from alignkit.serve.engine import Cancelled, Engine, Generation, Job, cut_at_stop
from alignkit.serve.schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    error_body,
)

MAX_BODY_BYTES = 2_000_000
POLL_S = 0.25
Chunker = Callable[[str | None, str | None], dict[str, Any]]


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


def chat_chunker(engine: Engine) -> Chunker:
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


def completion_chunker(engine: Engine) -> Chunker:
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


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def failure(exc: BaseException) -> ApiError:
    """What a client is told when its generation did not finish."""
    if isinstance(exc, Cancelled):
        return ApiError(
            503, "The generation was stopped: the server is shutting down.", code="shutting_down"
        )
    return ApiError(500, f"Generation failed: {exc}", code="server_error")


# ---------------------------------------------------------------- waiting on the engine


async def client_gone(http: Request) -> bool:
    return await http.is_disconnected()


async def finish(engine: Engine, job: Job, http: Request) -> Generation:
    """The job's result; its generation is cancelled if the client leaves first."""
    future = engine.submit(job)
    while True:
        done, _ = await asyncio.wait({future}, timeout=POLL_S)
        if done:
            break
        if await client_gone(http):
            engine.cancel(job)
            await asyncio.wait({future})
            break
    if future.exception() is not None:
        raise failure(future.exception())
    return future.result()


async def stream(engine: Engine, job: Job, chunk: Chunker, http: Request) -> Any:
    """Server-sent events: text deltas as they come, a finish chunk, [DONE]."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    job.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
    future = engine.submit(job)
    future.add_done_callback(lambda _: pieces.put_nowait(None))
    first = await first_piece(engine, pieces, job, http)
    if first is None and future.exception() is not None:
        raise failure(future.exception())  # nothing sent yet: an HTTP error
    events = stream_events(engine, first, pieces, future, job, chunk)
    return StreamingResponse(events, media_type="text/event-stream")


async def first_piece(engine: Engine, pieces: asyncio.Queue, job: Job, http: Request) -> str | None:
    while True:
        try:
            return await asyncio.wait_for(pieces.get(), timeout=POLL_S)
        except asyncio.TimeoutError:  # noqa: UP041 - not the builtin before Python 3.11
            if await client_gone(http):
                engine.cancel(job)


async def stream_events(
    engine: Engine,
    first: str | None,
    pieces: asyncio.Queue,
    future: asyncio.Future,
    job: Job,
    chunk: Chunker,
) -> AsyncIterator[str]:
    trimmer = StopTrimmer(job.request.stops())
    try:
        piece = first
        while piece is not None:
            if delta := trimmer.feed(piece):
                yield sse(chunk(delta, None))
            piece = await pieces.get()
        await asyncio.wait({future})
        if future.exception() is not None:
            error = failure(future.exception())
            yield sse(error_body(error.message, "server_error", code=error.code))
            yield "data: [DONE]\n\n"
            return
        gen: Generation = future.result()
        if tail := trimmer.flush():
            yield sse(chunk(tail, None))
        final = chunk(None, gen.finish_reason)
        if (job.request.stream_options or {}).get("include_usage"):
            final["usage"] = usage(gen)
        yield sse(final)
        yield "data: [DONE]\n\n"
    finally:  # the client closed the stream, or it ended: stop generating either way
        engine.cancel(job)


async def answer(
    engine: Engine, ids: list[int], request: Sampling, http: Request, kind: str
) -> Any:
    job = Job(ids, request, engine.budget(request, ids))
    if request.stream:
        chunker = chat_chunker(engine) if kind == "chat" else completion_chunker(engine)
        return await stream(engine, job, chunker, http)
    gen = await finish(engine, job, http)
    return chat_response(engine, gen) if kind == "chat" else completion_response(engine, gen)


# ---------------------------------------------------------------- the app


class BodyLimit:
    """ASGI middleware: a request body beyond `limit` bytes is answered 413 unread."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await too_large(self.limit, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_large(self.limit, send)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def too_large(limit: int, send: Any) -> None:
    body = json.dumps(
        error_body(f"The request body is over {limit} bytes.", "invalid_request_error")
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        kind = {401: "authentication_error"}.get(exc.status, "invalid_request_error")
        kind = "server_error" if exc.status >= 500 else kind
        body = error_body(exc.message, kind, exc.param, exc.code)
        return JSONResponse(body, exc.status, headers=exc.headers)

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


def create_app(engine: Engine, api_key: str | None = None) -> Any:
    app = FastAPI(title="alignkit", docs_url=None, redoc_url=None)
    add_error_handlers(app)
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def authorized(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if expected and not hmac.compare_digest(given, expected):
            raise ApiError(
                401,
                "Missing or wrong API key: send Authorization: Bearer <key>.",
                code="invalid_api_key",
            )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, **engine.counts}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "alignkit"}],
        }

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(request: ChatRequest, http: Request) -> Any:
        ids = await asyncio.to_thread(engine.chat_ids, request.messages)  # off the event loop
        return await answer(engine, ids, request, http, "chat")

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def complete(request: CompletionRequest, http: Request) -> Any:
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1:
            raise ApiError(400, "Send exactly one prompt per request.", "prompt", "invalid_value")
        ids = await asyncio.to_thread(engine.text_ids, prompts[0])
        return await answer(engine, ids, request, http, "completion")

    return BodyLimit(app)

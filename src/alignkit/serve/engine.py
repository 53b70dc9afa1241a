"""The server's requests: limits, a bounded queue, cancellation, and the shared batch.

Requests wait on an asyncio future, not on a thread, so a full queue never blocks the
server (`/health` keeps answering). Each job runs in a worker thread that hands it to the
`Batcher`, where it decodes together with the other requests of the moment. A job carries
a cancel flag that the batch checks between decoding steps: a client that disconnects or
times out stops its generation at the next token, a job cancelled while queued never
starts, and shutdown (SIGTERM) stops the running ones and refuses the rest.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from alignkit.chat_templates import ChatTemplate
from alignkit.generate import prompt_ids, stop_token_ids
from alignkit.serve.batch import Batcher, Cancelled, Request, Sampler
from alignkit.serve.schema import ApiError, ChatMessage, Sampling

RETRY_AFTER_S = 5
__all__ = ["Cancelled", "Engine", "Generation", "Job", "cut_at_stop"]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    ids: list[int] = field(default_factory=list)  # the completion's token ids


@dataclass
class Job:
    ids: list[int]
    request: Sampling
    budget: int
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    holds_slot: bool = False  # counted in the queue bound


@dataclass
class Engine:
    model: Any
    tokenizer: Any
    template: ChatTemplate
    name: str
    context_length: int
    max_queue: int = 16  # jobs waiting or running; more are answered 503
    max_batch: int = 8  # jobs decoded together
    stopping: threading.Event = field(default_factory=threading.Event)
    counts: dict[str, int] = field(
        default_factory=lambda: {"queued": 0, "running": 0, "done": 0, "cancelled": 0}
    )
    lock: threading.Lock = field(default_factory=threading.Lock)
    worker: ThreadPoolExecutor = field(init=False)
    batcher: Batcher = field(init=False)

    def __post_init__(self) -> None:
        # a thread per job waits on the batch; cancelled jobs leave theirs within a step
        self.worker = ThreadPoolExecutor(max_workers=self.max_queue + self.max_batch)
        stops = set(stop_token_ids(self.template, self.tokenizer))
        self.batcher = Batcher(self.model, self.tokenizer, stops, self.stopping, self.max_batch)

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        as_dicts = [{"role": m.role, "content": m.text()} for m in messages]
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

    def submit(self, job: Job) -> asyncio.Future:
        """Queue a job; 503 when the queue is full or closing."""
        with self.lock:
            if self.stopping.is_set():
                raise ApiError(503, "The server is shutting down.", code="shutting_down")
            if self.counts["queued"] >= self.max_queue:
                raise ApiError(
                    503,
                    f"The server is busy ({self.max_queue} requests queued); retry shortly.",
                    code="server_busy",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self.counts["queued"] += 1
            job.holds_slot = True
        return asyncio.wrap_future(self.worker.submit(self._run, job))

    def cancel(self, job: Job) -> None:
        """The client left: stop the job at its next token, and free its queue slot now
        (a job waiting behind a long generation must not keep others out)."""
        job.cancel.set()
        self._release(job)

    def _release(self, job: Job) -> None:
        with self.lock:
            if job.holds_slot:
                job.holds_slot = False
                self.counts["queued"] -= 1

    def _run(self, job: Job) -> Generation:
        self._count("running")
        try:
            if job.cancel.is_set() or self.stopping.is_set():
                raise Cancelled
            gen = self._generate(job)
            self._count("done")
            return gen
        except Cancelled:
            self._count("cancelled")
            raise
        finally:
            self._release(job)
            self._count("running", -1)

    def _count(self, key: str, step: int = 1) -> None:
        with self.lock:
            self.counts[key] += step

    def _generate(self, job: Job) -> Generation:
        """Decode the job in the shared batch (raises Cancelled when it is stopped)."""
        request, stops = job.request, job.request.stops()
        sampler = Sampler(request.temperature, request.top_p, request.top_k or 0, request.seed or 0)
        decoded = self.batcher.decode(
            Request(job.ids, job.budget, sampler, stops, job.on_text, job.cancel)
        )
        text, stopped = cut_at_stop(decoded.text, stops)
        reason = "stop" if stopped or decoded.reason == "stop" else "length"
        return Generation(text, len(job.ids), len(decoded.ids), reason, decoded.ids)

    def stop(self) -> None:
        """Shutdown: running generations end at their next token, queued jobs never run."""
        self.stopping.set()

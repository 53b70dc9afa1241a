"""The generation worker: one model, one generation at a time, a bounded queue.

Requests wait on an asyncio future, not on a thread, so a full queue never blocks the
server (`/health` keeps answering). Each job carries a cancel flag that generation
checks between decoding steps: a client that disconnects or times out stops its
generation at the next token, a job cancelled while queued never starts, and shutdown
(SIGTERM) stops the running one and refuses the rest.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from alignkit.chat import text_streamer
from alignkit.chat_templates import ChatTemplate
from alignkit.config import GenerationConfig
from alignkit.generate import generate_ids, prompt_ids, stop_token_ids
from alignkit.serve.schema import ApiError, ChatMessage, Sampling

RETRY_AFTER_S = 5


class Cancelled(Exception):
    """The job was stopped: its client left, or the server is shutting down."""


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


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


def cancel_check(job: Job, stopping: threading.Event) -> Any:
    """A stopping criterion that ends generation at the next step once the job is
    cancelled or the server stops, and marks the job as cut short."""
    from transformers import StoppingCriteria

    class CancelCheck(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            if job.cancel.is_set() or stopping.is_set():
                job.interrupted = True
            size = (input_ids.shape[0],)
            return torch.full(size, job.interrupted, dtype=torch.bool, device=input_ids.device)

    return CancelCheck()


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class Job:
    ids: list[int]
    request: Sampling
    budget: int
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    interrupted: bool = False  # generation was cut short by cancel or shutdown
    holds_slot: bool = False  # counted in the queue bound


@dataclass
class Engine:
    model: Any
    tokenizer: Any
    template: ChatTemplate
    name: str
    context_length: int
    max_queue: int = 16  # jobs waiting or running; more are answered 503
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))
    stopping: threading.Event = field(default_factory=threading.Event)
    counts: dict[str, int] = field(
        default_factory=lambda: {"queued": 0, "running": 0, "done": 0, "cancelled": 0}
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

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
        """Queue a job on the single worker; 503 when the queue is full or closing."""
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
            if job.interrupted:
                raise Cancelled
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
        request, ids = job.request, job.ids
        cfg = GenerationConfig(
            max_new_tokens=job.budget,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed or 0,
        )
        stops = request.stops()
        criteria = [cancel_check(job, self.stopping)]
        if stops:
            criteria.append(completion_stop(self.tokenizer, len(ids), stops))
        streamer = text_streamer(self.tokenizer, job.on_text) if job.on_text else None
        out = generate_ids(self.model, self.tokenizer, self.template, ids, cfg, streamer, criteria)
        text, stopped = cut_at_stop(self.tokenizer.decode(out, skip_special_tokens=True), stops)
        end_ids = stop_token_ids(self.template, self.tokenizer)
        ended = stopped or (len(out) > 0 and int(out[-1]) in end_ids) or len(out) < job.budget
        return Generation(text, len(ids), len(out), "stop" if ended else "length")

    def stop(self) -> None:
        """Shutdown: the running generation ends at its next token, queued jobs never run."""
        self.stopping.set()

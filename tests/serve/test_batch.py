"""The server's batch: requests decoded together give each what it would get alone.

Rows join at different steps, with prompts of different lengths and budgets, so the batch
pads on the left, joins caches, drops finished rows and trims columns along the way.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from families import tiny_model
from support import make_tiny_llama

from alignkit.chat_templates import resolve_template
from alignkit.config import GenerationConfig, ModelConfig
from alignkit.generate import generate_ids, prompt_ids, stop_token_ids
from alignkit.models import load_model
from alignkit.serve.batch import (
    Batcher,
    Cancelled,
    Request,
    Sampler,
    keep_top_k,
    keep_top_p,
)

QUESTIONS = [
    "Hi.",
    "Name a colour, please.",
    "What is the capital of France? Answer in one word.",
    "Count from one to ten, slowly, and explain each number in detail.",
    "Say red.",
    "Why is the sky blue?",
]
BUDGETS = [12, 5, 20, 16, 3, 9]


@pytest.fixture(scope="module")
def parts(smol_tokenizer, tmp_path_factory):
    path = make_tiny_llama(smol_tokenizer, tmp_path_factory.mktemp("batch"), init_std=0.2)
    model = load_model(ModelConfig(name_or_path=str(path), dtype="float32", device="cpu"))
    template = resolve_template(None, smol_tokenizer)
    prompts = [
        prompt_ids([{"role": "user", "content": q}], template, smol_tokenizer) for q in QUESTIONS
    ]
    return model.eval(), template, prompts


def batcher(parts, tokenizer, max_batch: int = 8) -> Batcher:
    model, template, _ = parts
    stops = set(stop_token_ids(template, tokenizer))
    return Batcher(model, tokenizer, stops, threading.Event(), max_batch)


def generate(parts, tokenizer, ids: list[int], budget: int) -> list[int]:
    """What transformers' generate makes of one prompt alone: the reference."""
    model, template, _ = parts
    cfg = GenerationConfig(max_new_tokens=budget, temperature=0)
    return generate_ids(model, tokenizer, template, ids, cfg).tolist()


def wait_for(condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the batch never got there"
        time.sleep(0.001)


def decode_all(b: Batcher, requests: list[Request], stagger: int = 0) -> list[list[int]]:
    """Decode requests from concurrent clients; the later half joins after the first
    half has decoded `stagger` steps' worth of tokens."""
    with ThreadPoolExecutor(len(requests)) as pool:
        half = len(requests) // 2
        first = [pool.submit(b.decode, r) for r in requests[:half]]
        if stagger:
            wait_for(lambda: any(len(row.out) >= stagger for row in b.rows))
        second = [pool.submit(b.decode, r) for r in requests[half:]]
        return [f.result().ids for f in first + second]


def test_greedy_rows_decode_the_same_tokens_batched_or_alone(parts, smol_tokenizer):
    _, _, prompts = parts
    expected = [
        generate(parts, smol_tokenizer, p, n) for p, n in zip(prompts, BUDGETS, strict=True)
    ]
    assert len({tuple(e) for e in expected}) == len(expected)  # the prompts really differ
    alone = batcher(parts, smol_tokenizer, max_batch=1)
    assert (
        decode_all(alone, [Request(p, n) for p, n in zip(prompts, BUDGETS, strict=True)])
        == expected
    )
    assert alone.largest == 1
    together = batcher(parts, smol_tokenizer)
    requests = [Request(p, n) for p, n in zip(prompts, BUDGETS, strict=True)]
    assert decode_all(together, requests, stagger=2) == expected
    assert together.largest > 3 and together.rows == [] and together.cache is None


def test_each_row_keeps_its_sampling_budget_stops_and_stream(parts, smol_tokenizer):
    _, _, prompts = parts
    b = batcher(parts, smol_tokenizer)
    sampled = Sampler(temperature=0.9, top_p=0.9, top_k=50, seed=7)
    alone = b.decode(Request(prompts[0], 12, sampled)).ids
    pieces: list[str] = []
    greedy = generate(parts, smol_tokenizer, prompts[3], 16)
    stop = smol_tokenizer.decode(greedy, skip_special_tokens=True)[3:6]
    requests = [
        Request(prompts[0], 12, sampled),
        Request(prompts[3], 16, stops=[stop], on_text=pieces.append),
        *[Request(p, n) for p, n in zip(prompts[1:3], BUDGETS[1:3], strict=True)],
    ]
    ids = decode_all(b, requests)
    assert ids[0] == alone  # its own random stream, whoever shares the batch
    text = smol_tokenizer.decode(ids[1], skip_special_tokens=True)
    assert len(stop) == 3 and stop in text and len(ids[1]) < len(greedy)  # ended at the stop
    assert "".join(pieces) == text  # streamed pieces add up to the text
    assert ids[2:] == [
        generate(parts, smol_tokenizer, p, n)
        for p, n in zip(prompts[1:3], BUDGETS[1:3], strict=True)
    ]


def test_a_cancelled_row_leaves_and_the_others_go_on(parts, smol_tokenizer):
    _, _, prompts = parts
    b = batcher(parts, smol_tokenizer)
    leaving = Request(prompts[3], 200)
    staying = [Request(p, 20) for p in prompts[:3]]
    with ThreadPoolExecutor(4) as pool:
        gone = pool.submit(b.decode, leaving)
        rest = [pool.submit(b.decode, r) for r in staying]
        wait_for(lambda: len(b.rows) == 4)
        leaving.cancel.set()
        with pytest.raises(Cancelled):
            gone.result()
        got = [f.result().ids for f in rest]
    assert got == [generate(parts, smol_tokenizer, p, 20) for p in prompts[:3]]


def test_a_row_whose_stream_fails_ends_alone(parts, smol_tokenizer):
    _, _, prompts = parts

    def gone(text: str) -> None:
        raise RuntimeError("the client's stream is closed")

    b = batcher(parts, smol_tokenizer)
    b.decode(Request(prompts[0], 1))  # now the batch knows its cache can be joined
    with ThreadPoolExecutor(3) as pool:
        rest = [pool.submit(b.decode, Request(p, 20)) for p in prompts[:2]]
        broken = pool.submit(b.decode, Request(prompts[3], 20, on_text=gone))
        with pytest.raises(RuntimeError, match="stream is closed"):
            broken.result()
        got = [f.result().ids for f in rest]
    assert got == [generate(parts, smol_tokenizer, p, 20) for p in prompts[:2]]
    assert b.largest >= 2


def test_a_model_whose_cache_cannot_be_joined_decodes_one_at_a_time(parts, smol_tokenizer):
    _, template, prompts = parts
    # a sliding-window cache: rows cannot be joined to it
    model = tiny_model("mistral", vocab=len(smol_tokenizer))
    slid = (model, template, prompts)
    b = batcher(slid, smol_tokenizer)
    ids = decode_all(b, [Request(p, 10) for p in prompts[:3]])
    assert b.joinable is False and b.largest == 1
    assert ids == [generate(slid, smol_tokenizer, p, 10) for p in prompts[:3]]


def test_top_k_and_top_p_keep_the_likeliest_tokens():
    scores = torch.tensor([1.0, 4.0, 2.0, 3.0])
    assert torch.isinf(keep_top_k(scores, 2)).tolist() == [True, False, True, False]
    # probabilities 0.5, 0.3, 0.2: with p = 0.6 the first two are needed (0.5 < 0.6), the
    # third is not (0.8 >= 0.6); with p = 0.5 the first alone reaches it
    scores = torch.tensor([0.5, 0.2, 0.3]).log()
    assert torch.isinf(keep_top_p(scores, 0.6)).tolist() == [False, True, False]
    assert torch.isinf(keep_top_p(scores, 0.5)).tolist() == [False, True, True]

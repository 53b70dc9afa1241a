"""The OpenAI-compatible server, answered by the official `openai` client and raw HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from support import free_port, make_tiny_llama, running

from alignkit.config import load_recipe
from alignkit.serve import StopTrimmer, create_app, cut_at_stop, load_engine
from alignkit.serve.schema import ChatMessage

openai = pytest.importorskip("openai")
NAME = "tiny"


@pytest.fixture(scope="module")
def engine(smol_tokenizer, tmp_path_factory):
    # init_std 0.2: greedy answers differ by prompt, so mixed-up outputs would show
    model_dir = make_tiny_llama(smol_tokenizer, tmp_path_factory.mktemp("serve"), init_std=0.2)
    return load_engine(load_recipe(None, [("model.name_or_path", str(model_dir))]), NAME)


@pytest.fixture(scope="module")
def url(engine):
    with running(create_app(engine)) as base:
        yield base


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def ask(url: str, text: str, **kwargs):
    settings = {"max_tokens": 8, "temperature": 0, **kwargs}
    messages = [{"role": "user", "content": text}]
    return client(url).chat.completions.create(model=NAME, messages=messages, **settings)


def test_chat_completion_with_usage(url, engine):
    reply = ask(url, "Say red.")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    ids = engine.chat_ids([ChatMessage(role="user", content="Say red.")])
    assert reply.usage.prompt_tokens == len(ids)
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_gives_the_same_text(url):
    whole = ask(url, "Count to three.").choices[0].message.content
    chunks = list(ask(url, "Count to three.", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and len(chunks) >= 3
    assert (
        chunks[-1].choices[0].finish_reason in ("stop", "length")
        and chunks[-1].usage.total_tokens > 0
    )


def test_stop_strings_cut_the_answer(url):
    whole = ask(url, "Tell me a story.", max_tokens=16).choices[0].message.content
    stop = whole[4:7]
    assert len(stop) == 3
    expected = whole[: whole.find(stop)]
    cut = ask(url, "Tell me a story.", max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    streamed = ask(url, "Tell me a story.", max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_models_completions_and_health(url):
    assert [m.id for m in client(url).models.list()] == [NAME]
    done = client(url).completions.create(
        model=NAME, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert done.choices[0].text and done.usage.completion_tokens <= 5
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


BAD = [
    ("not json", 400),
    ({"model": NAME}, 400),  # no messages
    ({"model": NAME, "messages": []}, 400),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi " * 3000}]}, 400),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404),
]


@pytest.mark.parametrize(("body", "status"), BAD)
def test_bad_requests_get_openai_shaped_4xx(url, body, status):
    if isinstance(body, str):
        response = httpx.post(
            f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    else:
        response = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert ask(url, "still there?").choices[0].message.content is not None  # keeps serving


def test_prompt_over_the_context_names_the_limit(url):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi " * 3000}]}
    error = httpx.post(f"{url}/v1/chat/completions", json=body).json()["error"]
    assert error["code"] == "context_length_exceeded" and "2048" in error["message"]


def test_eight_concurrent_requests_get_their_own_answers(url):
    prompts = [f"Question number {i}: name a colour." for i in range(8)]
    sequential = [ask(url, p).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda p: ask(url, p).choices[0].message.content, prompts))
    assert concurrent == sequential
    assert len(set(sequential)) > 1  # the prompts really lead to different answers


def test_api_key_is_required_when_set(engine):
    with running(create_app(engine, api_key="secret")) as base:
        for key in ("wrong", None):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            response = httpx.get(f"{base}/v1/models", headers=headers)
            assert (
                response.status_code == 401
                and response.json()["error"]["code"] == "invalid_api_key"
            )
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        assert [m.id for m in client(base, "secret").models.list()] == [NAME]
        assert httpx.get(f"{base}/health").status_code == 200


def test_stop_trimmer_holds_back_partial_stops():
    trimmer = StopTrimmer(["END"])
    out = [trimmer.feed(p) for p in ["hello E", "N", "D tail"]]
    assert "".join(out) + trimmer.flush() == "hello " and cut_at_stop("aENDb", ["END"]) == (
        "a",
        True,
    )


@contextmanager
def serve_command(model_dir: Path):
    """`alignkit serve MODEL` as a process on a free loopback port, once it answers."""
    port = free_port()
    alignkit = Path(sys.executable).with_name("alignkit")
    process = subprocess.Popen(
        [str(alignkit), "serve", str(model_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("server did not start")
        yield process, port
    finally:
        process.kill()
        process.wait(timeout=30)


def test_serve_command_binds_loopback(tiny_model_dir):
    with serve_command(tiny_model_dir) as (_, port):
        # psutil comes with accelerate
        listening = [
            c
            for c in psutil.net_connections("tcp")
            if c.laddr.port == port and c.status == "LISTEN"
        ]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)


def test_sigterm_with_a_stream_in_flight_ends_it_and_exits(tiny_model_dir):
    body = {
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
    }
    with serve_command(tiny_model_dir) as (process, port):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)

"""The server under clients that leave, load, bad requests and shutdown (issue: hardened).

The model's forward pass is slowed so a generation takes seconds: long enough to see
that a client's departure, a full queue or shutdown stops it within a few tokens.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from support import make_tiny_llama, running

from alignkit.config import load_recipe
from alignkit.serve import api_key, is_loopback, load_engine, serve
from alignkit.serve.app import create_app
from alignkit.serve.schema import MAX_SEED

openai = pytest.importorskip("openai")
NAME = "tiny"
STEP_S = 0.02  # seconds per forward pass: 400 tokens take 8 s
LONG = {"model": NAME, "messages": [{"role": "user", "content": "Tell a story."}]}


@pytest.fixture(scope="module")
def engine(smol_tokenizer, tmp_path_factory):
    model_dir = make_tiny_llama(smol_tokenizer, tmp_path_factory.mktemp("slow"), init_std=0.2)
    engine = load_engine(load_recipe(None, [("model.name_or_path", str(model_dir))]), NAME)
    forward = engine.model.forward

    def slow(*args, **kwargs):
        time.sleep(STEP_S)
        return forward(*args, **kwargs)

    engine.model.forward = slow
    return engine


@pytest.fixture
def url(engine):
    engine.stopping.clear()
    with running(create_app(engine)) as base:
        yield base
    wait_idle(engine)


def wait_idle(engine, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    busy = lambda: engine.counts["queued"] or engine.counts["running"]  # noqa: E731
    while busy() and time.monotonic() < end:
        time.sleep(0.05)
    assert not busy(), "a generation kept running"


def long_body(tokens: int = 400, **extra) -> dict:
    return {**LONG, "max_tokens": tokens, "temperature": 0, **extra}


def test_a_long_generation_really_takes_seconds(url, engine):
    started = time.monotonic()
    reply = httpx.post(f"{url}/v1/chat/completions", json=long_body(60), timeout=60).json()
    assert reply["usage"]["completion_tokens"] == 60  # no early end: the next tests rely on it
    assert time.monotonic() - started > 60 * STEP_S


def test_a_client_timeout_stops_its_generation(url, engine):
    before = engine.counts["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=long_body(), timeout=0.5)
    started = time.monotonic()
    wait_idle(engine, timeout=3)  # 400 tokens would take 8 s
    assert engine.counts["cancelled"] == before + 1
    quick = httpx.post(f"{url}/v1/chat/completions", json=long_body(3), timeout=10)
    assert quick.status_code == 200 and time.monotonic() - started < 4


def test_the_official_client_retrying_timeouts_leaves_no_generation_running(url, engine):
    before = engine.counts["cancelled"]
    retrying = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=2, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        retrying.chat.completions.create(
            model=NAME, messages=LONG["messages"], max_tokens=400, temperature=0
        )
    wait_idle(engine, timeout=3)  # one 400-token run alone would take 8 s
    assert engine.counts["cancelled"] == before + 3  # the first try and both retries


def test_a_closed_stream_stops_its_generation(url, engine):
    before = engine.counts["cancelled"]
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=long_body(stream=True), timeout=10
    ) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # one token arrived; then the client goes
    wait_idle(engine, timeout=3)
    assert engine.counts["cancelled"] == before + 1


def test_abandoned_requests_never_block_health(url, engine):
    def abandon(_):
        with contextlib.suppress(httpx.TransportError):
            httpx.post(f"{url}/v1/chat/completions", json=long_body(), timeout=0.3)

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(abandon, range(12)))
    started = time.monotonic()
    health = httpx.get(f"{url}/health", timeout=5)
    assert health.status_code == 200 and time.monotonic() - started < 1
    wait_idle(engine, timeout=5)


@contextmanager
def busy_server(engine, max_queue: int, tokens: int):
    """A live server with a queue of `max_queue`, already running one long generation."""
    engine.max_queue = max_queue
    try:
        with running(create_app(engine)) as base:
            long_request = threading.Thread(
                target=lambda: httpx.post(
                    f"{base}/v1/chat/completions", json=long_body(tokens), timeout=30
                )
            )
            long_request.start()
            while engine.counts["queued"] == 0:
                time.sleep(0.02)
            yield base
            long_request.join()
    finally:
        engine.max_queue = 16
    wait_idle(engine)


def test_a_full_queue_answers_503_with_retry_after(engine):
    with busy_server(engine, max_queue=1, tokens=100) as base:
        busy = httpx.post(f"{base}/v1/chat/completions", json=long_body(3), timeout=10)
        assert busy.status_code == 503 and busy.headers["retry-after"].isdigit()
        assert busy.json()["error"]["code"] == "server_busy"
        assert httpx.get(f"{base}/health", timeout=2).json()["queued"] == 1


def test_requests_abandoned_in_the_queue_free_their_slots(engine):
    with busy_server(engine, max_queue=3, tokens=150) as base:
        for _ in range(2):  # queued behind the long one, then abandoned
            with contextlib.suppress(httpx.TransportError):
                httpx.post(f"{base}/v1/chat/completions", json=long_body(3), timeout=0.5)
        time.sleep(3 * 0.25)  # the server notices within a few polls
        assert httpx.get(f"{base}/health").json()["queued"] == 1
        again = httpx.post(f"{base}/v1/chat/completions", json=long_body(3), timeout=30)
        assert again.status_code == 200  # not 503: the abandoned ones hold no slot


def test_shutdown_stops_the_running_generation_and_refuses_new_ones(url, engine):
    stream = httpx.stream("POST", f"{url}/v1/chat/completions", json=long_body(stream=True))
    with stream as response:
        lines = response.iter_lines()
        next(lines)
        started = time.monotonic()
        engine.stop()
        rest = [line for line in lines if line]
    assert time.monotonic() - started < 2
    assert json.loads(rest[-2].removeprefix("data: "))["error"]["message"]
    assert rest[-1] == "data: [DONE]"
    refused = httpx.post(f"{url}/v1/chat/completions", json=long_body(3), timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    engine.stopping.clear()


def raw_post(url: str, path: str, body: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.post(f"{url}{path}", content=body, headers=headers, timeout=10)


BAD = [
    ("seed above 64 bits", "/v1/chat/completions", {**long_body(2), "seed": MAX_SEED + 1}, 400),
    ("negative seed", "/v1/chat/completions", {**long_body(2), "seed": -1}, 400),
    ("empty prompt", "/v1/completions", {"model": NAME, "prompt": ""}, 400),
    ("empty prompt in a list", "/v1/completions", {"model": NAME, "prompt": [""]}, 400),
    (
        "image part",
        "/v1/chat/completions",
        {**LONG, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
    ),
    ("stop not text", "/v1/chat/completions", {**long_body(2), "stop": 5}, 400),
]


@pytest.mark.parametrize(("what", "path", "body", "status"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_400_and_the_server_keeps_serving(url, what, path, body, status):
    response = raw_post(url, path, json.dumps(body).encode())
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_lone_surrogate_is_a_400(url, path):
    text = '"caf\\ud800"'
    body = (
        f'{{"model": "{NAME}", "messages": [{{"role": "user", "content": {text}}}]}}'
        if "chat" in path
        else f'{{"model": "{NAME}", "prompt": {text}}}'
    )
    response = raw_post(url, path, body.encode())
    assert response.status_code == 400 and "surrogate" in response.json()["error"]["message"]


def test_an_oversized_body_is_413_before_it_is_read(url):
    body = json.dumps({**LONG, "messages": [{"role": "user", "content": "x" * 3_000_000}]})
    response = raw_post(url, "/v1/chat/completions", body.encode())
    assert response.status_code == 413 and "bytes" in response.json()["error"]["message"]


def test_text_parts_are_read_like_a_string(url):
    parts = [{"type": "text", "text": "Tell a "}, {"type": "text", "text": "story."}]
    as_parts = {**long_body(4), "messages": [{"role": "user", "content": parts}]}
    a = httpx.post(f"{url}/v1/chat/completions", json=as_parts, timeout=30).json()
    b = httpx.post(f"{url}/v1/chat/completions", json=long_body(4), timeout=30).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_a_failure_before_the_first_token_is_an_http_error(url, engine, monkeypatch):
    def broken(job):
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(engine, "_generate", broken)
    response = httpx.post(f"{url}/v1/chat/completions", json=long_body(5, stream=True))
    assert response.status_code == 500
    assert "fell over" in response.json()["error"]["message"]


def test_a_failure_after_tokens_ends_the_stream_with_an_error_and_done(url, engine, monkeypatch):
    def half(job):
        job.on_text("Once")
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(engine, "_generate", half)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=long_body(5, stream=True)) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "server_error"
    assert lines[-1] == "data: [DONE]"


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_API_KEY", "from-env")
    assert api_key(None, None) == "from-env"
    assert api_key("given", None) == "given"
    (tmp_path / "key").write_text("from-file\n")
    assert api_key("given", str(tmp_path / "key")) == "from-file"
    monkeypatch.delenv("ALIGNKIT_API_KEY")
    assert api_key(None, None) is None


def test_binding_beyond_loopback_without_a_key_warns(monkeypatch):
    import alignkit.serve as serving

    said = []

    class Stop(Exception):
        pass

    def no_model(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(serving, "load_engine", no_model)
    monkeypatch.setattr(serving, "check_bindable", lambda host, port: None)
    with pytest.raises(Stop):
        serve(None, "0.0.0.0", 8000, None, None, say=said.append)
    assert said and "without an API key" in said[0]
    said.clear()
    with pytest.raises(Stop):
        serve(None, "127.0.0.1", 8000, None, None, say=said.append)
    assert said == []
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.0.0.1")

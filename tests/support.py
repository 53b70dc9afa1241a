"""Helpers the tests share (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TRAIN = SHARED / "train"


def make_tiny_llama(tokenizer, path: Path, seed: int = 0, init_std: float = 0.02) -> Path:
    """A 2-layer, width-32 Llama with the SmolLM2 vocabulary, saved with its tokenizer.

    A larger `init_std` gives sharper, prompt-dependent greedy outputs (the default
    model repeats one token whatever the prompt)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=init_std,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def check_resume(train, make_recipe, tmp_path: Path, monkeypatch, weights: str) -> None:
    """A run killed while writing its third checkpoint (steps 5 and 6 logged, the last
    checkpoint at step 4) and resumed logs each step once, the same losses, and ends with
    the same weights as an uninterrupted run (make_recipe: 6 steps, save every 2)."""
    import torch
    from safetensors.torch import load_file

    import alignkit.train.loop as loop
    from alignkit.rundir import read_metrics

    full = train(make_recipe(tmp_path / "a"))
    expected = [r["loss"] for r in read_metrics(full / "metrics.jsonl") if "loss" in r]
    original = loop.save_checkpoint
    calls = {"n": 0}

    def killed_in_third_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", killed_in_third_save)
    r = make_recipe(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(r)
    killed = read_metrics(Path(r.train.output_dir) / "metrics.jsonl")
    assert [x["step"] for x in killed][-2:] == [5, 6]
    monkeypatch.setattr(loop, "save_checkpoint", original)
    r.train.resume = "auto"
    resumed = train(r)
    records = read_metrics(resumed / "metrics.jsonl")
    steps = [x["step"] for x in records]
    assert steps == sorted(set(steps))  # strictly increasing: no step logged twice
    got = [x["loss"] for x in records if "loss" in x]
    assert len(got) == 6
    assert got == pytest.approx(expected, abs=1e-6)
    a, b = load_file(full / weights), load_file(resumed / weights)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "templates"

# The special tokens each published template (tests/fixtures/templates) emits, with the
# BOS/EOS its model uses; SmolLM2 already has <|im_start|> (BOS) and <|im_end|> (EOS).
PUBLISHED_TOKENS = {
    "qwen3": {},
    "qwen3_training": {},
    "llama3_1": {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
    },
    "gemma3": {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
    },
    "mistral_v0_3": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "additional_special_tokens": ["[INST]", "[/INST]"],
    },
    "phi3": {
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    },
}


def published_template(smol_tokenizer, name: str):
    """(template, tokenizer) for a published template: a copy of the SmolLM2 tokenizer with
    the template's special tokens added, so no download is needed."""
    import copy

    from alignkit.chat_templates import resolve_template

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.add_special_tokens(PUBLISHED_TOKENS[name])
    return resolve_template(str(TEMPLATES / f"{name}.jinja"), tokenizer), tokenizer


def short_reward(prompts, completions):
    """A toy reward a tiny model learns in a few dozen steps: shorter text scores higher."""
    return [-len(c) / 40 for c in completions]

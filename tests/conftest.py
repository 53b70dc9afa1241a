"""Shared fixtures: the bundled SmolLM2 tokenizer and tiny random Llama models (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TRAIN = SHARED / "train"


@pytest.fixture(scope="session")
def smol_tokenizer():
    from alignkit.config import ModelConfig
    from alignkit.models import load_tokenizer

    return load_tokenizer(ModelConfig())


def make_tiny_llama(tokenizer, path: Path, seed: int = 0) -> Path:
    """A 2-layer, width-32 Llama with the SmolLM2 vocabulary, saved with its tokenizer."""
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
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(smol_tokenizer, tmp_path_factory) -> Path:
    return make_tiny_llama(smol_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path

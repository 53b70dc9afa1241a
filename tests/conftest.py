"""Shared fixtures: the bundled SmolLM2 tokenizer and tiny random Llama models (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import make_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from alignkit.config import ModelConfig
    from alignkit.models import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(smol_tokenizer, tmp_path_factory) -> Path:
    return make_tiny_llama(smol_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def peaky_model_dir(smol_tokenizer, tmp_path_factory) -> Path:
    """A tiny Llama with sharp next-token distributions: a few dozen samples per step of
    on-policy training carry a signal (alignkit online tests)."""
    return make_tiny_llama(smol_tokenizer, tmp_path_factory.mktemp("peaky-llama"), init_std=1.0)

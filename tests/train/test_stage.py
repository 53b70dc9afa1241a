"""What a training stage settles after loading the model: the row layout that computes
this model's own log-probs, LoRA settings the model allows, and embeddings for the
tokens a chat template adds."""

from __future__ import annotations

import io
import json

import torch
from families import tiny_model
from rich.console import Console
from safetensors.torch import load_file
from support import write_jsonl

from alignkit.config import ModelConfig, load_recipe
from alignkit.merge import merge_adapter
from alignkit.models import load_model
from alignkit.train.sft import train_sft

ROWS = [
    {"instruction": "Say red.", "output": "red red red"},
    {"instruction": "Say blue.", "output": "blue blue"},
    {"instruction": "Count to three.", "output": "one two three"},
    {"instruction": "Greet me.", "output": "hello there friend"},
]


def sft_recipe(tmp_path, model_dir, *extra: tuple[str, str]):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    overrides = [
        ("model.name_or_path", str(model_dir)),
        ("data.sources", str(data)),
        ("data.max_length", "64"),
        ("train.output_dir", str(tmp_path / "out")),
        ("train.micro_batch_size", "2"),
        ("train.learning_rate", "1e-2"),
        ("train.max_steps", "2"),
        *extra,
    ]
    return load_recipe(None, overrides)


def saved_family(family, tokenizer, path):
    model = tiny_model(family, vocab=len(tokenizer), sharpen=1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_quietly(recipe) -> tuple[str, dict]:
    out = io.StringIO()
    path = train_sft(recipe, Console(file=out, width=400))
    return out.getvalue(), json.loads((path / "run_info.json").read_text())


def test_a_family_block_attention_cannot_reproduce_trains_on_padded_rows_and_says_so(
    tmp_path, smol_tokenizer
):
    model_dir = saved_family("gptj", smol_tokenizer, tmp_path / "gptj")
    printed, info = run_quietly(sft_recipe(tmp_path, model_dir, ("train.packing", "true")))
    lines = [line for line in printed.splitlines() if "padding-free" in line]
    assert len(lines) == 1, printed
    assert "padding-free rows and packing off for this gptj model" in lines[0]
    assert "transformers' attention interface" in lines[0]
    assert info["padding_free"] is False and info["padding_free_off"] == lines[0]


def test_a_verified_family_keeps_padding_free_rows_without_a_word(tmp_path, tiny_model_dir):
    printed, info = run_quietly(sft_recipe(tmp_path, tiny_model_dir))
    assert "padding-free" not in printed
    assert info["padding_free"] is True and "padding_free_off" not in info


def test_lora_on_fused_moe_experts_runs_without_dropout_and_says_so(tmp_path, smol_tokenizer):
    """peft refuses LoRA dropout on fused expert weights; the default 0.05 used to crash."""
    model_dir = saved_family("mixtral", smol_tokenizer, tmp_path / "mixtral")
    printed, _ = run_quietly(sft_recipe(tmp_path, model_dir, ("model.adapter", "lora")))
    assert "lora.dropout 0.05 -> 0" in printed


def small_tokenizer_without_chatml():
    """A byte-level BPE tokenizer of a few hundred tokens with no ChatML markers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [r["instruction"] + " " + r["output"] for r in ROWS] * 20
    bpe.train_from_iterator(text, trainer)
    from tokenizers import decoders

    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


def test_chatml_tokens_the_tokenizer_lacks_get_trained_embedding_rows(tmp_path):
    tokenizer = small_tokenizer_without_chatml()
    model_dir = saved_family("llama", tokenizer, tmp_path / "base")
    rows = len(tokenizer)
    for adapter in ("lora", "none"):
        where = tmp_path / adapter
        where.mkdir()
        recipe = sft_recipe(
            where, model_dir, ("model.chat_template", "chatml"), ("model.adapter", adapter)
        )
        printed, _ = run_quietly(recipe)
        trained = load_model(ModelConfig(name_or_path=str(where / "out"))).eval()
        base = load_model(ModelConfig(name_or_path=str(model_dir)))
        base.resize_token_embeddings(rows + 2)
        new = trained.get_input_embeddings().weight[rows:]
        assert new.shape[0] == 2  # <|im_start|>, <|im_end|>
        assert not torch.allclose(new, base.get_input_embeddings().weight[rows:]), adapter
        old = trained.get_input_embeddings().weight[:rows]
        if adapter == "lora":  # the adapter trains only the new rows of the embeddings
            assert torch.equal(old, base.get_input_embeddings().weight[:rows])
        if adapter == "lora":  # merged, the new rows are part of the weights
            merged = merge_adapter(str(where / "out"), where / "merged")
            weights = load_file(merged / "model.safetensors")["model.embed_tokens.weight"]
            torch.testing.assert_close(weights[rows:], new.detach())
    weights = load_file(tmp_path / "none" / "out" / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape[0] == rows + 2

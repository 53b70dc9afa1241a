"""`alignkit export --gguf`: the file loads back into transformers with the same logits and
the same tokenizer (exactly in f32, within f16 noise in f16, within 8-bit noise in q8_0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import make_tiny_llama

from alignkit.errors import AlignkitError
from alignkit.export import (
    check_family,
    check_output,
    export_gguf,
    pre_tokenizer_name,
    rotate_pairs,
)

TEXTS = [
    "Hello world, 12345 tokens here!",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "ünïcödé  double  spaces\t\ttabs 😀 and\nnew lines",
]


def from_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def smol(smol_tokenizer, tmp_path_factory):
    """A tiny llama with the SmolLM2 tokenizer, its reference logits and its exports."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("export")
    model_dir = make_tiny_llama(smol_tokenizer, root / "model", init_std=0.2)
    ids = smol_tokenizer(TEXTS[1])["input_ids"]
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {"dir": model_dir, "ids": ids, "logits": logits(source, ids), "root": root}


def test_f16_loads_back_with_the_same_logits_and_tokenizer(smol, smol_tokenizer):
    from transformers import AutoTokenizer

    out = export_gguf(str(smol["dir"]), smol["root"] / "tiny-f16.gguf", "f16")
    got = logits(from_gguf(out), smol["ids"])
    scale = smol["logits"].abs().max()
    assert (got - smol["logits"]).abs().max() < 5e-3 * scale  # f16 rounding of the weights
    assert torch.equal(got.argmax(-1), smol["logits"].argmax(-1))
    tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == smol_tokenizer(text)["input_ids"], text
    assert tokenizer.chat_template == smol_tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


def byte_tokenizer():
    """A 300-token byte-level BPE tokenizer (GPT-2 style), trained here in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TEXTS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=specials[0],
        bos_token=specials[1],
        eos_token=specials[2],
    )


def tiny_config(kind: str, vocab: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    shape = {
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "initializer_range": 0.2,
    }
    if kind == "qwen2":
        return Qwen2Config(**shape, tie_word_embeddings=True)
    if kind == "mistral":
        return MistralConfig(**shape, sliding_window=None)
    return LlamaConfig(**shape, tie_word_embeddings=False)


def tiny_model(kind: str, tmp_path: Path):
    """A tiny model of a family with the byte tokenizer, saved; the model and tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer)))
    if kind == "qwen2":  # its q/k/v biases start at zero; make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.data.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return model, tokenizer


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_each_family_round_trips_exactly_in_f32(kind, tmp_path):
    model, tokenizer = tiny_model(kind, tmp_path)
    out = export_gguf(str(tmp_path / "model"), tmp_path / "m.gguf", "f32")
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert torch.allclose(logits(from_gguf(out), ids), logits(model, ids), atol=1e-5)


def test_q8_0_loads_back_within_8_bit_noise(tmp_path):
    model, tokenizer = tiny_model("llama", tmp_path)
    out = export_gguf(str(tmp_path / "model"), tmp_path / "m.gguf", "q8_0")
    ids = tokenizer(TEXTS[2])["input_ids"]
    expected, got = logits(model, ids), logits(from_gguf(out), ids)
    # each weight is within 1/254 of its 32-weight block's largest; through two layers of
    # sharp (init 0.2) weights the logits move by a few percent of their range
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    assert not torch.equal(got, expected)  # quantized, not stored as floats


def test_an_adapter_is_merged_into_its_base_first(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, tokenizer = tiny_model("llama", tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # the adapter names it
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapted = get_peft_model(base, lora)
    adapted.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    out = export_gguf(str(tmp_path / "adapter"), tmp_path / "adapter.gguf", "f32")
    ids = tokenizer(TEXTS[2])["input_ids"]
    expected = logits(adapted, ids)
    with adapted.disable_adapter():
        assert not torch.allclose(expected, logits(adapted, ids))  # the LoRA weights count
    assert torch.allclose(logits(from_gguf(out), ids), expected, atol=1e-5)


def test_rotary_rows_become_interleaved_pairs_per_head():
    # one head of 4 rows: halves [a0 a1 | b0 b1] -> pairs [a0 b0 a1 b1]
    rows = torch.arange(8.0).reshape(8, 1).numpy()  # two heads
    assert rotate_pairs(rows, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_other_architectures_and_scaled_rope_are_refused():
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(AlignkitError, match="llama, mistral, qwen2"):
        check_family(GPT2Config())
    scaled = LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(AlignkitError, match="'linear' rotary scaling"):
        check_family(scaled)
    with pytest.raises(AlignkitError, match="sliding_window"):
        check_family(tiny_config("mistral", 300).__class__(sliding_window=4096))


def test_the_pre_tokenizer_gets_llama_cpp_s_name_or_a_clear_refusal():
    byte_level = {"type": "ByteLevel", "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    sequence = {"type": "Sequence", "pretokenizers": [digits, {**byte_level}]}
    assert pre_tokenizer_name(sequence) == "smollm"
    with pytest.raises(AlignkitError, match=r"\['Whitespace'\].*convert_hf_to_gguf"):
        pre_tokenizer_name({"type": "Whitespace"})


def test_an_existing_file_is_kept_unless_overwrite(tmp_path, tiny_model_dir):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(AlignkitError, match="--overwrite"):
        export_gguf(str(tiny_model_dir), out)
    assert out.read_bytes() == b"precious"
    with pytest.raises(AlignkitError, match=r"\.gguf file"):
        check_output(tmp_path / "m.bin", overwrite=False)
    export_gguf(str(tiny_model_dir), out, "q8_0", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary left behind

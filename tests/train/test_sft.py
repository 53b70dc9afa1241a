from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from support import check_resume, write_jsonl

from alignkit.config import load_recipe
from alignkit.data.batching import flat_batch, pack_rows, pad_batch
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import AlignkitError
from alignkit.rundir import read_metrics
from alignkit.train.sft import sft_loss_sums, train_sft

ROWS = [
    {"instruction": "Say red.", "output": "red red red"},
    {"instruction": "Say blue.", "output": "blue blue"},
    {"instruction": "Count to three.", "output": "one two three"},
    {"instruction": "Greet me.", "output": "hello there friend"},
]


def recipe(tmp_path, model_dir, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    overrides = [
        ("model.name_or_path", str(model_dir)),
        ("data.sources", str(data)),
        ("data.max_length", "64"),
    ]
    settings = {
        "output_dir": str(tmp_path / "out"),
        "micro_batch_size": 2,
        "learning_rate": "1e-2",
        "max_steps": 4,
        **train,
    }
    overrides += [(f"train.{k}", str(v)) for k, v in settings.items()]
    return load_recipe(None, overrides)


def test_tiny_model_overfits_four_examples(tmp_path, tiny_model_dir):
    out = train_sft(recipe(tmp_path, tiny_model_dir, max_steps=30, scheduler="constant"))
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(losses) == 30 and losses[-1] < 0.3 * losses[0]
    for name in [
        "model.safetensors",
        "config.yaml",
        "training_curves.png",
        "tokenizer.json",
        "chat_template.jinja",
    ]:
        assert (out / name).is_file(), name


def test_lora_changes_only_adapter_weights(tmp_path, tiny_model_dir):
    r = recipe(tmp_path, tiny_model_dir, max_steps=3)
    r.model.adapter = "lora"
    out = train_sft(r)
    from alignkit.config import ModelConfig
    from alignkit.models import load_model

    base = load_file(tiny_model_dir / "model.safetensors")
    trained = load_model(ModelConfig(name_or_path=str(out)))  # base + adapter
    merged_base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in trained.state_dict().items()
        if "lora_" not in k
    }
    for name, value in base.items():
        assert torch.equal(merged_base[name], value), name  # bit-identical base weights
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0


def test_packed_loss_equals_unpacked(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(1)
    examples = [
        TokenizedExample(torch.randint(0, 500, (n,)).tolist(), [i >= n // 3 for i in range(n)])
        for n in (9, 5, 13, 7, 4)
    ]

    def loss_and_grads(batch):
        model.zero_grad()
        loss_sum, n, _ = sft_loss_sums(model, batch)
        (loss_sum / n).backward()
        return (loss_sum / n).item(), [p.grad.clone() for p in model.parameters()]

    plain, plain_grads = loss_and_grads(pad_batch(examples, 0))
    rows = pack_rows(examples, 20)
    assert len(rows) < len(examples)
    packed, packed_grads = loss_and_grads(flat_batch([e for row in rows for e in row]))
    assert abs(plain - packed) < 1e-5
    for a, b in zip(plain_grads, packed_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_resume_reproduces_uninterrupted_losses(tmp_path, tiny_model_dir, monkeypatch):
    # 4 rows, micro-batch 2: 2 steps per epoch, so the run crosses epochs and reshuffles
    def make(where):
        return recipe(where, tiny_model_dir, max_steps=6, save_steps=2)

    check_resume(train_sft, make, tmp_path, monkeypatch, "model.safetensors")


def test_non_empty_output_dir_is_refused(tmp_path, tiny_model_dir):
    r = recipe(tmp_path, tiny_model_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(AlignkitError, match="not empty.*--overwrite.*--resume"):
        train_sft(r)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_metrics_have_the_logged_fields(tmp_path, tiny_model_dir):
    out = train_sft(
        recipe(tmp_path, tiny_model_dir, max_steps=2, eval_fraction=0.25, micro_batch_size=1)
    )
    records = read_metrics(out / "metrics.jsonl")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens"} <= set(records[0])
    assert "eval_loss" in records[-1]
    assert json.loads(json.dumps(records))  # plain JSON


def test_trained_adapter_answers_through_chat(tmp_path, tiny_model_dir, capsys):
    from alignkit.cli import main

    r = recipe(tmp_path, tiny_model_dir, max_steps=2)
    r.model.adapter = "lora"
    out = train_sft(r)
    capsys.readouterr()
    assert main(["chat", str(out), "--prompt", "Say red.", "--max-new-tokens", "4"]) == 0
    assert "<|im_end|>" not in capsys.readouterr().out


def train_with_eval_source(r, tmp_path):
    """Train recipe `r` with a one-row separate eval source; return its metric records."""
    held_out = write_jsonl(
        tmp_path / "eval.jsonl", [{"prompt": "Say green.", "completion": "green"}]
    )
    r.data.eval_sources = load_recipe(
        None, [("data.eval_sources", str(held_out))]
    ).data.eval_sources
    return read_metrics(train_sft(r) / "metrics.jsonl")


def test_eval_loss_from_a_separate_source(tmp_path, tiny_model_dir):
    r = recipe(tmp_path, tiny_model_dir, max_steps=2, eval_steps=1)
    records = train_with_eval_source(r, tmp_path)
    assert [("eval_loss" in x) for x in records] == [True, True]
    assert records[0]["eval_loss"] != records[1]["eval_loss"]  # the model changed between evals


def test_report_to_tensorboard_writes_event_files(tmp_path, tiny_model_dir):
    out = train_sft(recipe(tmp_path, tiny_model_dir, max_steps=2, report_to="tensorboard"))
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_eval_sources_keep_every_training_row(tmp_path, tiny_model_dir):
    # eval_fraction 0.5 of 4 rows would leave 2 rows: one micro-batch per epoch, so step 2
    # would start epoch 1. With separate eval sources all 4 rows train: both steps in epoch 0.
    r = recipe(tmp_path, tiny_model_dir, max_steps=2, eval_fraction=0.5)
    records = train_with_eval_source(r, tmp_path)
    assert [x["epoch"] for x in records] == [0, 0]


def test_bf16_autocast_runs_on_cpu(tmp_path, tiny_model_dir, monkeypatch):
    import alignkit.train.stage as stage

    seen: set[torch.dtype] = set()
    real = stage.load_trainable

    def watched(*args, **kwargs):
        model = real(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        return model

    monkeypatch.setattr(stage, "load_trainable", watched)
    out = train_sft(recipe(tmp_path, tiny_model_dir, max_steps=3, mixed_precision="bf16"))
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert seen == {torch.bfloat16} and all(torch.isfinite(torch.tensor(losses)))
    weights = load_file(out / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}  # the master weights
    with pytest.raises(AlignkitError, match="fp16 needs a GPU"):
        train_sft(recipe(tmp_path / "b", tiny_model_dir, mixed_precision="fp16"))

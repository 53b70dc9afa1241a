"""One optimizer step of alignkit and of TRL's DPOTrainer on the same tiny model and pairs.

For every TRL loss type: the same loss, the same logged metrics (1e-4) and the same
weights after the step (AdamW, no dropout, one micro-batch holding every pair).
TRL is a test-only dependency (the `dev` extra).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from support import write_jsonl

from alignkit.chat_templates import resolve_template
from alignkit.config import load_recipe
from alignkit.data.sources import load_mixture
from alignkit.data.tokenize import tokenize_examples
from alignkit.models import load_tokenizer
from alignkit.rundir import read_metrics
from alignkit.train.pref import train_pref

trl = pytest.importorskip("trl")

PAIRS = [
    {"prompt": "Name a colour.", "chosen": "Blue, like the sky.", "rejected": "Seven."},
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "It is probably five or so."},
    {"prompt": "Greet me.", "chosen": "Hello there!", "rejected": "No."},
    {"prompt": "Say a fruit.", "chosen": "An apple.", "rejected": "A car, a tree and a dog."},
]
TRL_LOSSES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}
METRICS = [
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]
LR, BETA = 1e-3, 0.5


def alignkit_step(tmp_path, model_dir, data, loss: str):
    overrides = {
        "model.name_or_path": str(model_dir),
        "data.sources": str(data),
        "train.output_dir": str(tmp_path / "alignkit"),
        "train.micro_batch_size": len(PAIRS),
        "train.max_steps": 1,
        "train.learning_rate": LR,
        "train.scheduler": "constant",
        "pref.loss": loss,
        "pref.beta": BETA,
        "pref.label_smoothing": SMOOTHING.get(loss, 0.0),
    }
    recipe = load_recipe(None, [(k, str(v)) for k, v in overrides.items()])
    out = train_pref(recipe)
    return read_metrics(out / "metrics.jsonl")[0], load_file(out / "model.safetensors"), recipe


def trl_step(tmp_path, model_dir, recipe, loss: str):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(recipe.model)
    template = resolve_template(None, tokenizer)
    examples, _ = load_mixture(recipe.data.sources, False, 0)
    pairs, _ = tokenize_examples(examples, tokenizer, template, recipe.data)
    # TRL gets the exact text alignkit tokenized; its own tokenization must give the same ids
    rows = [
        {
            "prompt": tokenizer.decode(p.prompt_ids),
            "chosen": tokenizer.decode(p.chosen_ids),
            "rejected": tokenizer.decode(p.rejected_ids),
        }
        for p in pairs
    ]
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(PAIRS),
        max_steps=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        beta=BETA,
        loss_type=[loss],
        label_smoothing=SMOOTHING.get(loss, 0.0),
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        max_length=None,
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trl.DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    by_prompt = {tuple(p.prompt_ids): p for p in pairs}
    for item in trainer.train_dataset:
        ours = by_prompt[tuple(item["prompt_ids"])]
        assert (item["chosen_ids"], item["rejected_ids"]) == (ours.chosen_ids, ours.rejected_ids)
    trainer.train()
    log = trainer.state.log_history[0]
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return log, weights


@pytest.mark.parametrize("loss", TRL_LOSSES)
def test_one_step_matches_trl(tmp_path, tiny_model_dir, loss):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    ours, our_weights, recipe = alignkit_step(tmp_path, tiny_model_dir, data, loss)
    theirs, their_weights = trl_step(tmp_path, tiny_model_dir, recipe, loss)
    for key in METRICS:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key
    before = load_file(tiny_model_dir / "model.safetensors")
    for name, value in our_weights.items():
        torch.testing.assert_close(value, their_weights[name], atol=1e-5, rtol=0, msg=name)
    moved = [n for n, v in our_weights.items() if (v - before[n]).abs().max() > LR / 2]
    assert len(moved) > len(our_weights) // 2  # the step really changed the weights

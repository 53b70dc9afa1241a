"""Shipping a run: merge an adapter, write the model card, chat in the terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support import write_jsonl

from alignkit.card import write_card
from alignkit.chat import ChatSession, handle_command, open_session, run_repl
from alignkit.config import ModelConfig, load_recipe
from alignkit.errors import AlignkitError
from alignkit.merge import merge_adapter
from alignkit.models import load_model
from alignkit.rundir import read_metrics
from alignkit.train.pref import train_pref
from alignkit.train.sft import train_sft

SFT_ROWS = [
    {"instruction": f"Say {w}.", "output": f"{w} {w}"} for w in ["red", "blue", "green", "gold"]
]
PAIRS = [
    {"prompt": f"Name {w}.", "chosen": f"{w}!", "rejected": f"not {w} at all"}
    for w in ["red", "blue", "green", "gold"]
]
INPUT = torch.tensor([[1, 520, 33, 4450, 17, 2, 198, 1, 9531]])


def run(tmp: Path, model: str, rows: list, stage, **settings) -> Path:
    data = write_jsonl(tmp.with_suffix(".jsonl"), rows)
    overrides = {
        "model.name_or_path": model,
        "model.adapter": "lora",
        "data.sources": str(data),
        "data.max_length": 64,
        "train.output_dir": str(tmp),
        "train.micro_batch_size": 2,
        "train.learning_rate": 5e-2,
        "train.max_steps": 3,
        **settings,
    }
    return stage(load_recipe(None, [(k, str(v)) for k, v in overrides.items()]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """SFT LoRA -> merged -> preference LoRA on the merged model -> merged again."""
    root = tmp_path_factory.mktemp("ship")
    sft = run(root / "sft", str(tiny_model_dir), SFT_ROWS, train_sft)
    sft_merged = merge_adapter(str(sft), root / "sft-merged")
    pref = run(root / "pref", str(sft_merged), PAIRS, train_pref, **{"pref.loss": "apo_zero"})
    final = merge_adapter(str(pref), root / "final")
    return {
        "base": tiny_model_dir,
        "sft": sft,
        "sft_merged": sft_merged,
        "pref": pref,
        "final": final,
    }


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


@pytest.mark.parametrize(("adapter", "merged"), [("sft", "sft_merged"), ("pref", "final")])
def test_merged_logits_equal_the_adapter_model(runs, adapter, merged):
    from transformers import AutoModelForCausalLM

    with_adapter = logits(load_model(ModelConfig(name_or_path=str(runs[adapter]))))
    plain = logits(AutoModelForCausalLM.from_pretrained(runs[merged], dtype=torch.float32))
    torch.testing.assert_close(plain, with_adapter, atol=1e-5, rtol=1e-5)
    before = logits(
        AutoModelForCausalLM.from_pretrained(
            runs["base"] if adapter == "sft" else runs["sft_merged"], dtype=torch.float32
        )
    )
    assert (plain - before).abs().max() > 1e-3  # the adapter mattered


def test_merged_dir_loads_without_peft(runs):
    code = f"""
import sys, torch
sys.modules["peft"] = None  # any import of peft now fails
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(runs["final"])!r}, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained({str(runs["final"])!r})
assert tokenizer.chat_template
with torch.no_grad():
    print(float(model(input_ids=torch.tensor({INPUT.tolist()})).logits.sum()))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = logits(load_model(ModelConfig(name_or_path=str(runs["pref"])))).sum().item()
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-4)
    info = json.loads((runs["final"] / "merge_info.json").read_text())
    assert info["base"] == str(runs["sft_merged"])


def test_merge_refuses_bad_inputs(runs, tmp_path):
    with pytest.raises(AlignkitError, match="not a LoRA adapter dir"):
        merge_adapter(str(runs["sft_merged"]), tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(AlignkitError, match="not empty"):
        merge_adapter(str(runs["sft"]), busy)
    assert (busy / "keep.txt").read_text() == "mine"


def eval_result(path: Path, name: str, value: float, items: int) -> Path:
    """An `alignkit eval` results.json with one GSM8K figure over `items` of 1319."""
    item = {
        "label": "GSM8K (5-shot, flexible-extract)",
        "metric": "exact_match",
        "value": value,
        "stderr": 0.1,
        "items": items,
        "total_items": 1319,
    }
    limit = None if items == 1319 else items
    path.write_text(json.dumps({"model": name, "limit": limit, "summary": {"gsm8k": item}}))
    return path


def test_card_holds_the_runs_real_numbers(runs, tmp_path):
    results = [
        eval_result(tmp_path / f"{name}.json", name, value, 1319)
        for name, value in (("base", 0.25), ("final", 0.5))
    ]
    card = write_card([runs["sft"], runs["final"]], results).read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == str(runs["base"]) and meta["license"] == "other"
    assert meta["datasets"] == ["pref.jsonl", "sft.jsonl"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 50.0
    for stage in ("sft", "pref"):
        records = read_metrics(runs[stage] / "metrics.jsonl")
        assert f"loss {records[-1]['loss']:.4f}" in card
        info = json.loads((runs[stage] / "run_info.json").read_text())
        assert f"{info['train_rows']} " in card and f"{info['train_seconds'] / 60:.1f} min" in card
    assert "preference (apo_zero)" in card and "beta 0.1" in card and "lr 0.05" in card
    assert "<|im_start|>assistant" in card  # the chat format, rendered by the saved template
    row = "| GSM8K (5-shot, flexible-extract) | 25.0 ± 10.0 | **50.0** ± 10.0 | all 1319 items |"
    assert row in card and "partial" not in card


def test_a_partial_eval_stays_out_of_model_index_and_is_marked_in_the_card(runs, tmp_path):
    results = [
        eval_result(tmp_path / f"{name}.json", name, value, 8)
        for name, value in (("base", 0.25), ("final", 0.5))
    ]
    card = write_card([runs["final"]], results, out=tmp_path / "card.md").read_text()
    assert "model-index" not in yaml.safe_load(card.split("---")[1])
    assert "| 25.0 ± 10.0 | **50.0** ± 10.0 | partial: 8 of 1319 items |" in card
    assert "at most 8 items per benchmark" in card
    assert "leaves out the partial figures (GSM8K (5-shot, flexible-extract))" in card


def test_card_usage_code_runs(runs, tmp_path, capsys):
    card = write_card([runs["final"]], [], out=tmp_path / "card.md", name="my-model").read_text()
    code = card.split("## Usage")[1].split("```python")[1].split("```")[0]
    exec(code.replace('"my-model"', repr(str(runs["final"]))).replace("128", "4"), {})
    assert capsys.readouterr().out.strip() != ""


def test_a_run_and_its_merged_dir_are_one_stage(runs, tmp_path):
    card = write_card([runs["sft"], runs["sft_merged"]], [], out=tmp_path / "card.md").read_text()
    assert "| 1 | SFT |" in card and "| 2 |" not in card


def test_card_does_not_replace_a_foreign_readme(runs, tmp_path):
    out = tmp_path / "README.md"
    out.write_text("# my own notes\n")
    with pytest.raises(AlignkitError, match="not written by alignkit"):
        write_card([runs["sft"]], [], out=out)
    write_card([runs["sft"]], [], out=out, overwrite=True)
    assert "No benchmark results" in out.read_text()


def session(model_dir) -> ChatSession:
    recipe = load_recipe(
        None, [("model.name_or_path", str(model_dir)), ("generation.max_new_tokens", "12")]
    )
    return open_session(recipe)


def test_session_streams_and_keeps_history(runs):
    chat = session(runs["final"])
    pieces: list[str] = []
    answer = chat.reply("Say red.", on_text=pieces.append)
    assert len(pieces) >= 2 and "".join(pieces).strip() == answer
    chat.reply("And blue?")
    assert [m["role"] for m in chat.messages()] == ["user", "assistant", "user", "assistant"]
    out: list[str] = []
    assert handle_command(chat, "/system Be brief.", out.append)
    assert chat.history == [] and chat.messages() == [{"role": "system", "content": "Be brief."}]
    chat.reply("Hi")
    assert chat.messages()[0] == {"role": "system", "content": "Be brief."}
    assert handle_command(chat, "/reset", out.append) and len(chat.messages()) == 1
    assert not handle_command(chat, "/exit", out.append)


def test_repl_reads_lines_until_exit(runs):
    chat = session(runs["final"])
    lines = iter(["Say red.", "/reset", "", "Say blue.", "/bogus", "/exit", "never read"])
    written: list[str] = []
    run_repl(chat, lambda prompt: next(lines), written.append)
    text = "".join(written)
    assert text.count("assistant> ") == 2 and "(conversation cleared)" in text
    assert "unknown command /bogus" in text and len(chat.history) == 2


def test_chat_command_through_stdin(runs):
    alignkit = Path(sys.executable).with_name("alignkit")
    result = subprocess.run(
        [
            str(alignkit),
            "chat",
            str(runs["final"]),
            "--max-new-tokens",
            "6",
            "--system",
            "Be brief.",
        ],
        input="Say red.\n/reset\nSay blue.\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("assistant> ") == 2 and "(conversation cleared)" in result.stdout

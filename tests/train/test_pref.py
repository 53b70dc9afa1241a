"""`alignkit pref` end to end on tiny models: reference handling, cache, losses, errors."""

from __future__ import annotations

import pytest
import torch
from support import check_resume, make_tiny_llama, write_jsonl

import alignkit.train.pref as pref
import alignkit.train.reference as reference
from alignkit.cli import main
from alignkit.config import ModelConfig, load_recipe
from alignkit.data.batching import IGNORE, feedback_batch, pair_batch, with_kl_completions
from alignkit.data.tokenize import TokenizedFeedback, TokenizedPair
from alignkit.errors import AlignkitError
from alignkit.models import load_model
from alignkit.rundir import read_metrics
from alignkit.train.logps import sequence_logps
from alignkit.train.pref import train_pref
from alignkit.train.stage import load_stage_data

PAIRS = [
    {
        "prompt": f"Question {i}: name a colour.",
        "chosen": f"Blue {i}.",
        "rejected": f"No idea at all {i}.",
    }
    for i in range(8)
]
FEEDBACK = [
    {
        "messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}],
        "label": i % 2 == 0,
    }
    for i, w in enumerate(["yes", "no", "maybe", "sure", "never", "ok", "fine", "bad"])
]


def recipe(tmp_path, model_dir, rows=PAIRS, **settings):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    overrides = {
        "model.name_or_path": str(model_dir),
        "data.sources": str(data),
        "data.max_length": 64,
        "train.output_dir": str(tmp_path / "out"),
        "train.micro_batch_size": 2,
        "train.learning_rate": 1e-2,
        "train.max_steps": 2,
        **settings,
    }
    return load_recipe(None, [(k, str(v)) for k, v in overrides.items()])


def tokenized_pairs():
    return [
        TokenizedPair([1, 5, 6], [7, 8, 2], [9, 2]),
        TokenizedPair([1, 10], [11, 2], [12, 13, 14, 2]),
    ]


def test_pair_batch_scores_completions_only():
    batch = pair_batch(tokenized_pairs(), pad_id=0)
    assert batch.units == 2 and batch.slots == 4
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; labels only on completion tokens
    assert batch.labels[0].tolist() == [IGNORE] * 3 + [7, 8, 2]
    assert batch.labels[3].tolist() == [IGNORE, IGNORE, 12, 13, 14, 2]
    assert batch.owner[2].tolist() == [-1, -1, -1, 2, 2, -1]
    assert batch.trained_tokens == 3 + 2 + 2 + 4


def test_feedback_batch_pairs_each_prompt_with_the_next_completion():
    items = [TokenizedFeedback([1, 5], [6, 2], True), TokenizedFeedback([1, 7], [8, 9, 2], False)]
    batch = feedback_batch(with_kl_completions(items, []), pad_id=0, max_length=64)
    assert batch.desirable.tolist() == [True, False]
    assert batch.input_ids[2, :5].tolist() == [1, 5, 8, 9, 2]  # prompt 0 + completion 1
    assert batch.input_ids[3, :4].tolist() == [1, 7, 6, 2]  # prompt 1 + completion 0
    assert batch.trained_tokens == 2 + 3  # the KL sequences are scored, not trained


def test_kl_completions_come_from_the_next_row_or_the_other_split():
    rows = [TokenizedFeedback([1], [10 + i], True) for i in range(3)]
    paired = with_kl_completions(rows, [])
    assert [r.kl_completion_ids for r in paired] == [[11], [12], [10]]
    one = [TokenizedFeedback([1], [20], False)]
    assert with_kl_completions(one, rows)[0].kl_completion_ids == [10]
    with pytest.raises(AlignkitError, match="only one row"):
        with_kl_completions(one, [])


def test_sequence_logps_equal_a_full_log_softmax(tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    batch = pair_batch(tokenized_pairs(), pad_id=0)
    sums, counts = sequence_logps(model, batch)
    logps = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logps = logps.log_softmax(-1)
    for slot in range(batch.slots):
        positions = (batch.owner[slot] >= 0).nonzero().flatten().tolist()
        expected = sum(logps[slot, t - 1, batch.input_ids[slot, t]] for t in positions)
        assert sums[slot].item() == pytest.approx(expected.item(), abs=1e-5)
        assert counts[slot].item() == len(positions)


def test_lora_reference_is_the_base_model_exactly(tmp_path, tiny_model_dir):
    out = train_pref(recipe(tmp_path, tiny_model_dir, **{"model.adapter": "lora"}))
    base = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    tuned = load_model(ModelConfig(name_or_path=str(out)))  # base + trained adapter
    batch = pair_batch(tokenized_pairs(), pad_id=0)
    with torch.no_grad():
        base_sums = sequence_logps(base, batch)[0]
        with reference.adapter_off(tuned):
            ref_sums = sequence_logps(tuned, batch)[0]
        tuned_sums = sequence_logps(tuned, batch)[0]
    assert torch.equal(ref_sums, base_sums)
    assert not torch.allclose(tuned_sums, base_sums)  # the adapter did change the policy


def counting(monkeypatch):
    """Count reference forwards (precompute batches and adapter-off passes)."""
    calls = {"precompute": 0, "forward": 0}
    compute, off = pref.compute_reference, reference.adapter_off

    def counted_compute(*args, **kwargs):
        calls["precompute"] += 1
        return compute(*args, **kwargs)

    def counted_off(model):
        calls["forward"] += 1
        return off(model)

    monkeypatch.setattr(pref, "compute_reference", counted_compute)
    monkeypatch.setattr(reference, "adapter_off", counted_off)
    return calls


def test_precomputed_reference_is_cached_reused_and_invalidated(
    tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    settings = {"model.adapter": "lora", "pref.precompute_ref": "true", "train.eval_fraction": 0.25}
    calls = counting(monkeypatch)
    first = train_pref(recipe(tmp_path / "a", tiny_model_dir, **settings))
    assert calls["precompute"] == 2  # train and eval pairs
    evals = [r for r in read_metrics(first / "metrics.jsonl") if "eval_loss" in r]
    assert evals and all(r["eval_units"] == round(len(PAIRS) * 0.25) for r in evals)
    files = list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))
    assert len(files) == 2

    calls.update(precompute=0, forward=0)
    second = train_pref(recipe(tmp_path / "b", tiny_model_dir, **settings, **{"pref.beta": 0.3}))
    assert calls == {"precompute": 0, "forward": 0}  # no reference forward at all
    last = [read_metrics(run / "metrics.jsonl")[-1]["loss"] for run in (first, second)]
    assert last[0] != last[1]  # beta changed the training, the cache still applied

    train_pref(recipe(tmp_path / "c", tiny_model_dir, **settings, **{"data.max_length": 20}))
    assert calls["precompute"] == 2  # other tokenized data: recomputed
    other = make_tiny_llama(load_tokenizer_for(tiny_model_dir), tmp_path / "other", seed=1)
    train_pref(recipe(tmp_path / "d", other, **settings))
    assert calls["precompute"] == 4  # other reference weights: recomputed
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))) == 6
    unshared = recipe(
        tmp_path / "e",
        tiny_model_dir,
        **settings,
        **{"pref.share_prompt": False, "train.eval_on_start": True},
    )
    start = read_metrics(train_pref(unshared) / "metrics.jsonl")[0]
    assert calls["precompute"] == 6  # another batch layout: recomputed, so that at step 0
    assert start["step"] == 0 and start["eval_rewards/margins"] == 0  # policy ties exactly
    bf16 = {**settings, "train.mixed_precision": "bf16", "train.eval_on_start": True}
    start = read_metrics(
        train_pref(recipe(tmp_path / "f", tiny_model_dir, **bf16)) / "metrics.jsonl"
    )[0]
    # the reference is precomputed under the run's own autocast: a bf16 run computes its
    # own cache (bf16 rounding would break the fp32 ties) and its policy ties exactly
    assert calls["precompute"] == 8
    assert start["step"] == 0 and start["eval_rewards/margins"] == 0


def load_tokenizer_for(model_dir):
    from alignkit.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(model_dir)))


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_precomputed_and_live_reference_train_identically(
    tmp_path, tiny_model_dir, monkeypatch, adapter
):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    runs = {}
    for precompute in ("false", "true"):
        out = train_pref(
            recipe(
                tmp_path / precompute,
                tiny_model_dir,
                **{
                    "model.adapter": adapter,
                    "pref.precompute_ref": precompute,
                    "train.max_steps": 3,
                },
            )
        )
        runs[precompute] = read_metrics(out / "metrics.jsonl")
    for live, cached in zip(runs["false"], runs["true"], strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert cached[key] == pytest.approx(live[key], abs=1e-5)


def test_full_weights_with_another_reference_model(tmp_path, tiny_model_dir):
    other = make_tiny_llama(load_tokenizer_for(tiny_model_dir), tmp_path / "ref", seed=3)
    settings = {"pref.ref_model": str(other), "train.max_steps": 1, "train.micro_batch_size": 8}
    r = recipe(tmp_path, tiny_model_dir, **settings)
    first = read_metrics(train_pref(r) / "metrics.jsonl")[0]
    # step 1 rewards are b (log pi - log ref) with pi = the untouched starting model

    data = load_stage_data(r, ("pair",))
    batch = pair_batch(data.train_rows, data.tokenizer.pad_token_id)
    policy = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    ref = load_model(ModelConfig(name_or_path=str(other)))
    with torch.no_grad():
        ratio = sequence_logps(policy, batch)[0] - sequence_logps(ref, batch)[0]
    assert first["rewards/chosen"] == pytest.approx(0.1 * ratio[:8].mean().item(), abs=1e-4)
    assert abs(first["rewards/chosen"]) > 1e-3


@pytest.mark.parametrize("loss", ["simpo", "cpo", "orpo"])
def test_reference_free_losses_load_no_reference(tmp_path, tiny_model_dir, monkeypatch, loss):
    def refuse(*args):
        raise AssertionError("a reference was loaded")

    monkeypatch.setattr(pref, "load_reference", refuse)
    monkeypatch.setattr(pref, "reference_scorer", refuse)
    out = train_pref(recipe(tmp_path, tiny_model_dir, **{"pref.loss": loss, "train.max_steps": 6}))
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_kto_trains_on_unpaired_feedback(tmp_path, tiny_model_dir):
    out = train_pref(
        recipe(
            tmp_path,
            tiny_model_dir,
            rows=FEEDBACK,
            **{
                "pref.loss": "kto",
                "model.adapter": "lora",
                "train.max_steps": 4,
                "train.micro_batch_size": 4,
            },
        )
    )
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 4 and all("kl" in r and r["kl"] >= 0 for r in records)
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference: 1 - sigma(0)


def kto_parts(tmp_path, model_dir, monkeypatch, rows, **settings) -> dict:
    """What train_pref hands the loop for a KTO run (rows, eval rows, batch maker)."""
    parts = {}

    def capture(run, **given):
        parts.update(given, eval_rows=run.data.eval_rows)

    monkeypatch.setattr(pref, "train_and_save", capture)
    train_pref(recipe(tmp_path, model_dir, rows=rows, **{"pref.loss": "kto", **settings}))
    return parts


def test_kto_batches_of_one_score_another_rows_completion(tmp_path, tiny_model_dir, monkeypatch):
    other = make_tiny_llama(load_tokenizer_for(tiny_model_dir), tmp_path / "ref", seed=3)
    held_out = {
        "messages": [
            {"role": "user", "content": "Say perhaps."},
            {"role": "assistant", "content": "perhaps"},
        ],
        "label": True,
    }
    settings = {
        "pref.ref_model": str(other),
        "train.micro_batch_size": 1,
        "data.eval_sources": str(write_jsonl(tmp_path / "eval.jsonl", [held_out])),
    }
    parts = kto_parts(tmp_path, tiny_model_dir, monkeypatch, FEEDBACK, **settings)
    rows = parts["rows"] + parts["eval_rows"]
    assert len(parts["eval_rows"]) == 1
    policy = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    ref = load_model(ModelConfig(name_or_path=str(other)))
    for row in rows:
        batch = parts["make_batch"]([row])
        kl_completion = batch.labels[batch.owner == 1].tolist()
        assert kl_completion != row.completion_ids
        assert any(kl_completion == r.completion_ids for r in rows if r is not row)
        with torch.no_grad():
            ratio = sequence_logps(policy, batch)[0] - sequence_logps(ref, batch)[0]
        # the KL estimate is not the example's own log-ratio (its reward / beta)
        assert ratio[1].item() != pytest.approx(ratio[0].item(), abs=1e-4)


def test_kto_on_a_single_row_is_refused(tmp_path, tiny_model_dir):
    settings = {"pref.loss": "kto", "train.micro_batch_size": 1}
    with pytest.raises(AlignkitError, match="only one row"):
        train_pref(recipe(tmp_path, tiny_model_dir, rows=FEEDBACK[:1], **settings))
    assert not (tmp_path / "out").exists()


def test_apo_zero_learns_and_logs_trl_metrics(tmp_path, tiny_model_dir):
    out = train_pref(
        recipe(
            tmp_path,
            tiny_model_dir,
            **{
                "pref.loss": "apo_zero",
                "model.adapter": "lora",
                "train.max_steps": 8,
                "train.eval_fraction": 0.25,
                "train.eval_on_start": "true",
                "train.scheduler": "constant",
                "train.learning_rate": 3e-2,
            },
        )
    )
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["step"] == 0 and records[0]["eval_rewards/margins"] == 0  # before training
    last = records[-1]
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "loss",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "eval_rewards/accuracies",
        "eval_rewards/margins",
        "eval_loss",
    ):
        assert key in last, key
    assert last["rewards/margins"] > 0 and last["loss"] < records[1]["loss"]
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert (out / "adapter_model.safetensors").is_file()


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    def make(where):
        return recipe(
            where,
            tiny_model_dir,
            **{"model.adapter": "lora", "train.max_steps": 6, "train.save_steps": 2},
        )

    check_resume(train_pref, make, tmp_path, monkeypatch, "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pref.loss": "apo-zero"}, "Did you mean 'apo_zero'"),
        ({"pref.loss": "sigmoid,sft", "pref.loss_weights": "1.0"}, "one weight per loss"),
        ({"pref.loss": "kto,sigmoid"}, "cannot be combined"),
        ({"pref.loss": "exo_pair"}, "label_smoothing in (0, 1)"),
        ({"pref.loss": "kto"}, "feedback data"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path, tiny_model_dir, settings, message):
    with pytest.raises(AlignkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_pref(recipe(tmp_path, tiny_model_dir, **settings))


def test_sft_data_is_refused(tmp_path, tiny_model_dir):
    rows = [{"instruction": "Say hi.", "output": "hi"}] * 4
    with pytest.raises(AlignkitError, match="pair data"):
        train_pref(recipe(tmp_path, tiny_model_dir, rows=rows))


def test_cli_dpo_alias_runs(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    code = main(
        [
            "dpo",
            "--model",
            str(tiny_model_dir),
            "--loss",
            "ipo",
            "--beta",
            "0.2",
            f"data.sources={data}",
            "--output-dir",
            str(tmp_path / "out"),
            "--train.max_steps",
            "1",
            "--max-length",
            "64",
        ]
    )
    assert code == 0
    saved = load_recipe(tmp_path / "out" / "config.yaml")
    assert saved.pref.loss == ["ipo"] and saved.pref.beta == 0.2


def test_the_reference_cache_key_names_the_numerics_actually_applied(tmp_path, tiny_model_dir):
    from types import SimpleNamespace

    r = recipe(tmp_path, tiny_model_dir)

    def acc(precision, native_amp, kind="NO"):
        return SimpleNamespace(
            mixed_precision=precision, native_amp=native_amp, distributed_type=f"Kind.{kind}"
        )

    plain = pref.scoring_method(r, acc("no", False))
    assert pref.scoring_method(r, acc("bf16", True)) != plain  # autocast applied
    # DeepSpeed reports bf16 without autocasting (native_amp False): the values are not
    # autocast ones, and its engine's own bf16 weights are not a single device's either
    deepspeed = pref.scoring_method(r, acc("bf16", False, "DEEPSPEED"))
    assert "autocast" not in deepspeed and deepspeed != plain
    assert pref.scoring_method(r, acc("no", False, "MULTI_CPU")) == plain  # DDP: same numerics

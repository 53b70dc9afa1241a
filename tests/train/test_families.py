"""The architecture matrix: on every family, the default training path equals the padded one.

For each model type in `families.FAMILIES` (tiny random configs, weights sharpened so
that differences show), the path a run takes with default settings (padding-free rows,
shared prompts, chunked head; or padded rows where `exact_layout` switches them off)
must give the padded path's SFT loss, preference log-probs, reference log-probs and
gradients (fp32, 1e-5), with full weights and with LoRA, and must leave the model's
plain forward as it was. Families that fall back must say why, and must need to: their
padding-free rows differ from the padded ones (or fail).
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, tiny_model

from alignkit.config import LoraConfig, Recipe, TrainConfig
from alignkit.data.batching import pack_rows, pad_batch, pair_batch
from alignkit.data.tokenize import TokenizedExample, TokenizedPair
from alignkit.models import add_lora
from alignkit.train.attention import VERIFIED_FAMILIES, padding_free_problem
from alignkit.train.logps import sequence_logps
from alignkit.train.pref import pair_layout
from alignkit.train.reference import reference_scorer
from alignkit.train.sft import sft_batcher, sft_loss_sums
from alignkit.train.stage import exact_layout

TOL = 1e-5
GRAD_TOL = 1e-4
# families whose own attention block attention cannot reproduce (the README's table)
FALLBACK = {"qwen3_next", "gemma2", "gptj", "gpt_neo", "falcon", "gpt_oss"}


def token_ids(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


def examples() -> list[TokenizedExample]:
    rows = token_ids([9, 5, 13, 7, 4], seed=1)
    return [TokenizedExample(ids, [i >= len(ids) // 3 for i in range(len(ids))]) for ids in rows]


def pairs() -> list[TokenizedPair]:
    p, c, r = token_ids([7, 1, 12], 2), token_ids([5, 4, 3], 3), token_ids([9, 2, 8], 4)
    return [TokenizedPair(*parts) for parts in zip(p, c, r, strict=True)]


def with_lora(model):
    """A LoRA-wrapped model whose B matrices are random (at init they are zero, which
    would hide the A gradients)."""
    model = add_lora(model, LoraConfig(r=4, target_modules=["all-linear"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval()  # get_peft_model switches to train mode: LoRA dropout would differ


def value_and_grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    value = fn()
    value.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def assert_same(plain, fast, what: str) -> None:
    """Values to 1e-5; each gradient to 1e-4 of its norm. fp32 sums run in another order
    on the two paths, and sharpened weights make gradients large: in float64 the
    padding-free rows agree to 1e-15 and the shared prompt to 1e-7 (its log-softmax
    stays float32)."""
    (value_a, grads_a), (value_b, grads_b) = plain, fast
    torch.testing.assert_close(value_b, value_a, atol=TOL, rtol=TOL, msg=what)
    assert grads_a and grads_a.keys() == grads_b.keys(), what
    for name, grad in grads_a.items():
        error = float((grads_b[name] - grad).norm() / grad.norm().clamp_min(1e-12))
        assert error < GRAD_TOL, f"{what}: {name} differs by {error:.1e} of its norm"


def sft_value(model, batch, chunk: int) -> torch.Tensor:
    loss_sum, count, _ = sft_loss_sums(model, batch, chunk)
    return loss_sum / count


def pair_value(model, batch, chunk: int) -> torch.Tensor:
    """Per-slot log-prob sums, weighted so every slot reaches the gradients."""
    sums, _ = sequence_logps(model, batch, chunk)
    return sums * torch.linspace(0.5, 1.5, len(sums))


def check_default_path(model, cfg: TrainConfig, what: str) -> None:
    """SFT (plain and packed) and preference pairs under the run's settings `cfg`."""
    chunk, rows = cfg.logps_chunk, examples()
    plain = value_and_grads(model, lambda: sft_value(model, pad_batch(rows, 0), 0))
    fast = value_and_grads(model, lambda: sft_value(model, sft_batcher(cfg, 0)(rows), chunk))
    assert_same(plain, fast, f"{what} sft")
    packed_cfg, _ = exact_layout(TrainConfig(packing=True), model)
    bins = pack_rows(rows, 20) if packed_cfg.packing else rows
    packed = value_and_grads(
        model, lambda: sft_value(model, sft_batcher(packed_cfg, 0)(bins), chunk)
    )
    assert_same(plain, packed, f"{what} packed sft")
    layout = pair_layout(Recipe(train=cfg))
    plain = value_and_grads(model, lambda: pair_value(model, pair_batch(pairs(), 0), 0))
    fast = value_and_grads(model, lambda: pair_value(model, pair_batch(pairs(), 0, layout), chunk))
    assert_same(plain, fast, f"{what} pairs ({layout})")


def check_reference_pass(policy, cfg: TrainConfig) -> None:
    """The reference scores (adapter off, no gradients) equal the padded ones."""
    score = reference_scorer(policy, policy, None, cfg.logps_chunk)
    fast = score(pair_batch(pairs(), 0, pair_layout(Recipe(train=cfg))))
    with policy.disable_adapter(), torch.no_grad():
        plain, _ = sequence_logps(policy, pair_batch(pairs(), 0), 0)
    torch.testing.assert_close(fast, plain, atol=TOL, rtol=TOL)


def plain_logits(model) -> torch.Tensor:
    batch = pad_batch(examples(), 0)
    with torch.no_grad():
        return model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_path_equals_the_padded_path(family):
    model = tiny_model(family)
    before = plain_logits(model)
    cfg, note = exact_layout(TrainConfig(), model)
    assert (note is None) == (family not in FALLBACK), note
    assert cfg.padding_free == (family not in FALLBACK)
    check_default_path(model, cfg, f"{family} full weights")
    torch.testing.assert_close(plain_logits(model), before, atol=0, rtol=0)
    policy = with_lora(model)
    check_default_path(policy, cfg, f"{family} LoRA")
    check_reference_pass(policy, cfg)


@pytest.mark.parametrize("family", sorted(FALLBACK))
def test_fallback_families_need_it(family):
    """Their padding-free rows would train another model: they differ or fail."""
    model = tiny_model(family)
    assert padding_free_problem(model) is not None
    with torch.no_grad():
        plain, _ = sequence_logps(model, pair_batch(pairs(), 0), 0)
        try:
            fast, _ = sequence_logps(model, pair_batch(pairs(), 0, "flat"), 0)
        except ValueError:  # e.g. soft-capping, which SDPA refuses
            return
    assert (fast - plain).abs().max() > 1e-3


def test_the_verified_families_are_the_matrix_less_its_fallbacks():
    assert set(FAMILIES) - FALLBACK == VERIFIED_FAMILIES


def test_an_unverified_family_keeps_padded_rows():
    model = tiny_model("llama")
    model.config.model_type = "my_llama_variant"
    cfg, note = exact_layout(TrainConfig(), model)
    assert not cfg.padding_free and "not verified for 'my_llama_variant'" in note
    untouched, none = exact_layout(TrainConfig(padding_free=False), model)
    assert untouched == TrainConfig(padding_free=False) and none is None


def test_the_readme_table_lists_every_family_with_what_runs_fast():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "padded" in line]
    fast = next(line for line in readme.splitlines() if line.startswith("| llama,"))
    assert {f.strip() for f in fast.split("|")[1].split(",")} == VERIFIED_FAMILIES
    for family in FALLBACK:
        row = next(r for r in rows if family in r.split("|")[1].replace(" ", "").split(","))
        reason = padding_free_problem(tiny_model(family)).removeprefix("its ").removeprefix("it ")
        assert reason.split(" ")[-1] in row, (family, reason)

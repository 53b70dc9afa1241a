"""The lm-eval speed-ups: equal to lm-eval's own paths, and pinned to the internals they
override, so an lm-eval or transformers upgrade that changes them fails here, loudly."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from families import FAMILIES, VOCAB, tiny_model
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]

# the lm-eval methods SharedContextLM overrides or calls through super(), with the
# parameters it passes; and the attributes it reads
HFLM_METHODS = {
    "_loglikelihood_tokens": ["self", "requests", "disable_tqdm", "override_bs"],
    "_model_generate": ["self", "context", "max_length", "stop", "generation_kwargs"],
    "generate_until": ["self", "requests", "disable_tqdm"],
}
HFLM_ATTRIBUTES = (
    "batch_size_per_gpu",
    "batch_size",
    "backend",
    "max_length",
    "cache_hook",
    "rank",
    "model",
)
# the transformers cache-layer methods GrowingLayer overrides
CACHE_LAYER_METHODS = {
    "update": ["self", "key_states", "value_states", "args", "kwargs"],
    "lazy_initialization": ["self", "key_states", "value_states"],
    "crop": ["self", "tokens_to_remove"],
    "batch_repeat_interleave": ["self", "repeats"],
    "batch_select_indices": ["self", "indices"],
    "reorder_cache": ["self", "beam_idx"],
}


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize("name", sorted(HFLM_METHODS))
def test_overridden_lm_eval_methods_are_unchanged(name):
    from lm_eval.models.huggingface import HFLM

    assert parameters(getattr(HFLM, name)) == HFLM_METHODS[name], (
        f"lm-eval changed HFLM.{name}; alignkit.eval.fastlm overrides it. Re-check the override "
        "and the lm-eval pin in pyproject.toml."
    )


def test_lm_eval_attributes_the_override_reads_exist():
    from lm_eval.models.huggingface import HFLM

    source = inspect.getsource(HFLM)
    missing = [a for a in HFLM_ATTRIBUTES if f"self.{a}" not in source and a not in dir(HFLM)]
    assert not missing, f"lm-eval's HFLM no longer has {missing}"


@pytest.mark.parametrize("name", sorted(CACHE_LAYER_METHODS))
def test_overridden_cache_layer_methods_are_unchanged(name):
    from transformers.cache_utils import DynamicLayer

    assert parameters(getattr(DynamicLayer, name)) == CACHE_LAYER_METHODS[name], (
        f"transformers changed DynamicLayer.{name}; alignkit.eval.fastlm.GrowingLayer overrides it."
    )


def test_installed_lm_eval_is_inside_the_pinned_range():
    from importlib.metadata import version

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [Requirement(r) for r in project["optional-dependencies"]["eval"]]
    lm_eval = next(r for r in pins if r.name == "lm-eval")
    assert any(spec.operator == "<" for spec in lm_eval.specifier), "lm-eval needs an upper bound"
    assert Version(version("lm-eval")) in lm_eval.specifier


def test_shared_context_scores_equal_lm_evals(tiny_model_dir, smol_tokenizer):
    from lm_eval.models.huggingface import HFLM

    from alignkit.config import ModelConfig
    from alignkit.eval.fastlm import SharedContextLM
    from alignkit.models import load_model

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")).eval()
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 5000, (n,), generator=gen).tolist()

    requests = []
    for context_len in (1, 7, 40):
        context = ids(context_len)
        requests += [(None, context, ids(n)) for n in (1, 1, 3, 9)]
    requests.append((None, ids(2045), ids(5)))  # beyond the window: lm-eval's truncating path
    greedy_context = ids(6)  # a continuation that is the model's own greedy choice
    with torch.no_grad():
        greedy = model(torch.tensor([greedy_context])).logits[0, -1].argmax().item()
    requests.append((None, greedy_context, [greedy]))
    kwargs = {"pretrained": model, "tokenizer": smol_tokenizer, "batch_size": 3, "device": "cpu"}
    plain = HFLM(**kwargs)._loglikelihood_tokens(requests, disable_tqdm=True)
    shared = SharedContextLM(**kwargs)._loglikelihood_tokens(requests, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(plain, shared, strict=True):
        assert b == pytest.approx(a, abs=1e-4) and greedy_a == greedy_b
    assert shared[-1][1] is True


def test_contexts_sharing_a_prefix_run_it_once_and_score_as_lm_eval(tiny_model_dir, smol_tokenizer):
    """MMLU's 5-shot contexts share their shots within a subject: the shared prefix runs
    once per run of such contexts, each item only its own tokens, with lm-eval's scores."""
    from lm_eval.models.huggingface import HFLM

    from alignkit.config import ModelConfig
    from alignkit.eval import fastlm
    from alignkit.eval.fastlm import MIN_SHARED_PREFIX, SharedContextLM
    from alignkit.models import load_model

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")).eval()
    with torch.no_grad():  # sharper weights, so that a wrong cache would show
        for p in model.parameters():
            p.mul_(3.0)
    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 5000, (n,), generator=gen).tolist()

    shots, other = ids(3 * MIN_SHARED_PREFIX), ids(3 * MIN_SHARED_PREFIX)
    contexts = [shots + ids(n) for n in (1, 5, 12)] + [other + ids(4), other + ids(9)]
    contexts.append(ids(MIN_SHARED_PREFIX // 2))  # shares nothing: runs whole
    requests = [(None, c, ids(n)) for c in contexts for n in (1, 2, 4)]
    kwargs = {"pretrained": model, "tokenizer": smol_tokenizer, "batch_size": 4, "device": "cpu"}
    plain = HFLM(**kwargs)._loglikelihood_tokens(requests, disable_tqdm=True)
    fed: list[int] = []

    def count(_, args, kwargs):
        fed.append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1])

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    shared = SharedContextLM(**kwargs)._loglikelihood_tokens(requests, disable_tqdm=True)
    with_sharing, fed[:] = sum(fed), []
    with pytest.MonkeyPatch.context() as mp:  # no prefix is long enough to share
        mp.setattr(fastlm, "MIN_SHARED_PREFIX", 10**9)
        unshared = SharedContextLM(**kwargs)._loglikelihood_tokens(requests, disable_tqdm=True)
    hook.remove()
    for (a, greedy_a), (b, greedy_b), (c, greedy_c) in zip(plain, shared, unshared, strict=True):
        assert b == pytest.approx(a, abs=1e-4) and greedy_a == greedy_b
        assert c == pytest.approx(a, abs=1e-4) and greedy_a == greedy_c
    # each shared prefix ran once: 2 of the 3 shot contexts' and 1 of the 2 others' spared
    assert sum(fed) - with_sharing == 2 * len(shots) + len(other)


def test_growing_cache_generates_what_the_dynamic_cache_does(tiny_model_dir, smol_tokenizer):
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import Cache

    from alignkit.eval.fastlm import GrowingLayer, growing_cache_fits

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert growing_cache_fits(model)
    smol_tokenizer.padding_side = "left"
    batch = smol_tokenizer(
        ["Hello there", "A much longer prompt than the first one"],
        return_tensors="pt",
        padding=True,
    )
    kwargs = {"max_new_tokens": 300, "min_new_tokens": 300, "do_sample": False}  # > 256: regrows
    plain = model.generate(**batch, **kwargs)
    cache = Cache(layer_class_to_replicate=GrowingLayer)
    grown = model.generate(**batch, past_key_values=cache, **kwargs)
    assert torch.equal(plain, grown)
    layer = cache.layers[0]
    assert layer.buffers[0].shape[-2] == 512 and layer.keys.shape[-2] == grown.shape[1] - 1
    layer.batch_select_indices(torch.tensor([1]))  # edits leave plain tensors, then regrow
    keys, _ = layer.update(layer.keys[..., -1:, :], layer.values[..., -1:, :])
    assert keys.shape[0] == 1 and torch.equal(keys[..., -1, :], keys[..., -2, :])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_scoring_equals_one_full_forward_in_every_family(family, smol_tokenizer):
    """Scoring a context's choices on its KV cache, whole or after a shared prefix's copied
    cache, gives what one forward over context + choice gives: sliding windows (shorter
    than the context here) and MoE routing included. A model whose cache holds a state
    that cannot be copied per choice (linear attention) is scored by lm-eval's own path."""
    from alignkit.eval.fastlm import (
        SharedContextLM,
        cached_scoring_fits,
        run_prefix,
        score_continuations,
    )

    model = tiny_model(family).eval()
    gen = torch.Generator().manual_seed(2)
    context = torch.randint(0, VOCAB, (20,), generator=gen).tolist()
    choices = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (1, 3, 5)]
    with torch.no_grad():
        expected = []
        for choice in choices:
            logits = model(torch.tensor([context + choice])).logits[0].float().log_softmax(-1)
            steps = logits[len(context) - 1 : -1]
            expected.append(float(steps.gather(-1, torch.tensor(choice)[:, None]).sum()))
    if cached_scoring_fits(model):
        prefix = run_prefix(model, tuple(context[:12]))
        runs = [
            score_continuations(model, context, choices, batch_size=2),
            score_continuations(model, context, choices, 2, prefix),
        ]
    else:
        assert family == "qwen3_next"  # the one family here with linear-attention layers
        lm = SharedContextLM(pretrained=model, tokenizer=smol_tokenizer, batch_size=2, device="cpu")
        requests = [(None, context, choice) for choice in choices]
        runs = [lm._loglikelihood_tokens(requests, disable_tqdm=True)]
    for run in runs:
        for want, (got, _) in zip(expected, run, strict=True):
            assert got == pytest.approx(want, abs=1e-4)

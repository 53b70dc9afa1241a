"""Sampled completions: exact masks, their training batch, online-DPO pairs."""

from __future__ import annotations

import pytest
import torch

from alignkit.data.tokenize import TokenizedPair
from alignkit.train.logps import token_logps
from alignkit.train.rollout import (
    Rollout,
    SamplingSettings,
    best_worst_pairs,
    per_completion,
    rollout_batch,
    sample_rollouts,
    trim_completion,
)

STOP = 2


def test_trim_keeps_the_first_stop_token_and_drops_what_follows():
    assert trim_completion([5, 6, STOP, 0, 0, STOP], {STOP}) == ([5, 6, STOP], True)
    assert trim_completion([STOP, 7], {STOP, 9}) == ([STOP], True)
    assert trim_completion([5, 6, 7], {STOP}) == ([5, 6, 7], False)  # clipped at the limit


def tiny_causal_lm(seed=0, vocab=40):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=1.0,  # peaky: the stop token is sampled within a few tokens
        pad_token_id=0,
        eos_token_id=STOP,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def test_sampled_completions_end_at_their_stop_token_with_exact_masks():
    model = tiny_causal_lm()
    prompts = [[1, 5, 6, 7], [1, 9]]
    settings = SamplingSettings(k=4, max_new_tokens=6)
    rollouts = sample_rollouts(model, prompts, settings, [STOP, 3], pad_id=0, seed=3)
    assert [r.group for r in rollouts] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [r.prompt_ids for r in rollouts] == [prompts[0]] * 4 + [prompts[1]] * 4
    stopped = [r for r in rollouts if r.stopped]
    clipped = [r for r in rollouts if not r.stopped]
    assert stopped and clipped  # both kinds occur with this seed
    for r in stopped:
        assert r.completion_ids[-1] in (STOP, 3)
        assert not {STOP, 3} & set(r.completion_ids[:-1])
        assert len(r.completion_ids) <= 6
    for r in clipped:
        assert len(r.completion_ids) == 6 and not {STOP, 3} & set(r.completion_ids)
    again = sample_rollouts(model, prompts, settings, [STOP, 3], pad_id=0, seed=3)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in rollouts]
    for padding_free in (True, False):
        batch = rollout_batch(rollouts, pad_id=0, padding_free=padding_free)
        _, mask = per_completion(torch.zeros(batch.trained_tokens), batch, len(rollouts))
        assert mask.sum(1).tolist() == [len(r.completion_ids) for r in rollouts]


def reference_logps(model, rollout):
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    logps = model(ids).logits[0, :-1].log_softmax(-1)
    start = len(rollout.prompt_ids) - 1
    targets = torch.tensor(rollout.completion_ids)
    return logps[start : start + len(targets)].gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize(
    ("padding_free", "share_all"), [(True, True), (True, False), (False, False)]
)
def test_rollout_batch_scores_each_completion_token_like_a_plain_forward(padding_free, share_all):
    """Padding-free (all of a prompt's completions on one copy of it, or two by two with
    an odd one alone) and padded layouts give each completion token the log-prob of a
    forward of its own."""
    model = tiny_causal_lm(seed=1)
    rollouts = [
        Rollout(0, [1, 5, 6], [7, 8, STOP], True),
        Rollout(0, [1, 5, 6], [9, STOP], True),
        Rollout(0, [1, 5, 6], [4, 4, 4, 4], False),
        Rollout(1, [1, 11], [12, STOP], True),
        Rollout(1, [1, 11], [13, 14, 15], False),
        Rollout(2, [1, 16, 17], [18, STOP], True),
    ]
    with torch.no_grad():
        batch = rollout_batch(rollouts, 0, padding_free, share_all)
        values, mask = per_completion(token_logps(model, batch, 0), batch, len(rollouts))
    if share_all:  # each prompt once; a branch after the first repeats its last token
        prompt_tokens = sum(len(p) for p in ([1, 5, 6], [1, 11], [1, 16, 17]))
        completion_tokens = sum(len(r.completion_ids) for r in rollouts)
        repeats = 2 + 1  # groups of 3 and 2 completions (the lone one needs none)
        assert batch.input_ids.shape[1] == prompt_tokens + completion_tokens + repeats
    for i, r in enumerate(rollouts):
        n = len(r.completion_ids)
        assert mask[i].tolist() == [True] * n + [False] * (mask.shape[1] - n)
        torch.testing.assert_close(values[i, :n], reference_logps(model, r), atol=1e-5, rtol=0)


def test_two_per_copy_keeps_a_sliding_window_exact():
    """Mistral's window (6 tokens, tests/families.py) is shorter than these sequences: the
    two-branch blocks it gets reproduce each completion's own forward."""
    from families import tiny_model

    from alignkit.train.online_update import one_prompt_copy

    model = tiny_model("mistral")
    assert not one_prompt_copy(model)
    prompt = [1, 5, 6, 7, 8, 9, 10]
    rollouts = [Rollout(0, prompt, [11 + i, 12, 13, 14, 15, STOP], True) for i in range(3)]
    with torch.no_grad():
        batch = rollout_batch(rollouts, 0, padding_free=True)
        values, _ = per_completion(token_logps(model, batch, 0), batch, len(rollouts))
    for i, r in enumerate(rollouts):
        torch.testing.assert_close(values[i], reference_logps(model, r), atol=1e-5, rtol=0)


def test_best_vs_worst_pairs_skip_ties_with_a_count():
    p = [1, 2]
    rollouts = [Rollout(g, p, [10 + 3 * g + i], True) for g in range(3) for i in range(3)]
    rewards = [0.5, 1.0, 0.0, 0.3, 0.3, 0.3, 0.0, 0.2, 0.2]
    pairs, ties = best_worst_pairs(rollouts, rewards, k=3)
    assert ties == 1  # the second prompt's three rewards are equal
    assert pairs == [TokenizedPair(p, [11], [12]), TokenizedPair(p, [17], [16])]

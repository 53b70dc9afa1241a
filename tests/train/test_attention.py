"""Block attention honours a sliding window exactly, per branch of a shared prompt."""

from __future__ import annotations

import torch
from families import tiny_config

from alignkit.data.batching import pair_batch
from alignkit.data.tokenize import TokenizedPair
from alignkit.train.attention import branch_window, causal_window
from alignkit.train.logps import sequence_logps


def mistral(window: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("mistral")
    config.sliding_window = window
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4 if param.dim() > 1 else 1)
    return model


def test_pairs_whose_branches_fit_the_window_are_scored_as_padded_rows():
    """Defect 10: prompt + chosen + rejected (15 tokens) was measured against a window of
    12 and refused, though each branch (10 tokens) fits."""
    model = mistral(window=12)
    pairs = [TokenizedPair(list(range(10, 15)), list(range(20, 25)), list(range(30, 35)))]
    with torch.no_grad():
        plain, _ = sequence_logps(model, pair_batch(pairs, 0))
        shared, _ = sequence_logps(model, pair_batch(pairs, 0, "shared"), 4)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


def test_a_window_shorter_than_a_sequence_is_applied_inside_it():
    pairs = [TokenizedPair(list(range(10, 19)), list(range(20, 27)), list(range(30, 33)))]
    scores = {}
    for window in (4, 64):
        model = mistral(window)
        with torch.no_grad():
            plain, _ = sequence_logps(model, pair_batch(pairs, 0))
            shared, _ = sequence_logps(model, pair_batch(pairs, 0, "shared"), 4)
        torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
        scores[window] = plain
    assert (scores[4] - scores[64]).abs().max() > 1e-2  # the window matters here


def test_window_masks_count_positions_from_each_sequence_start():
    assert causal_window(3, 4) is None  # short enough: the causal flag alone
    band = causal_window(4, 2)
    assert band.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, True, True, False],
        [False, False, True, True],
    ]
    # second branch at positions 2, 3 after a shared part at 0, 1; keys [0, 1 | 2, 3]
    assert branch_window(2, 2, 2).tolist() == [
        [False, True, True, False],
        [False, False, True, True],
    ]

from __future__ import annotations

import pytest

from alignkit.data.batching import (
    IGNORE,
    SequenceBatch,
    feedback_batch,
    pair_batch,
    with_kl_completions,
)
from alignkit.data.tokenize import TokenizedFeedback, TokenizedPair


def scored(batch: SequenceBatch) -> list[list[int]]:
    """The label ids each slot scores."""
    return [
        batch.labels[(batch.owner == slot) & (batch.labels != IGNORE)].tolist()
        for slot in range(batch.slots)
    ]


@pytest.mark.parametrize("layout", ["padded", "flat", "shared"])
def test_unscored_completion_tokens_get_no_label(layout):
    # chosen = [assistant 3, user turn 4, assistant 5]: the user turn is context only
    pairs = [
        TokenizedPair([1, 2], [3, 4, 5], [6, 7], chosen_mask=[True, False, True]),
        TokenizedPair([1], [8], [9, 10], rejected_mask=[False, True]),
    ]
    batch = pair_batch(pairs, pad_id=0, layout=layout)
    assert scored(batch) == [[3, 5], [8], [6, 7], [10]]
    assert batch.trained_tokens == 6


def test_feedback_masks_follow_their_completion_into_the_kl_sequences():
    items = [
        TokenizedFeedback([1], [3, 4, 5], True, completion_mask=[True, False, True]),
        TokenizedFeedback([2], [6, 7], False),
    ]
    batch = feedback_batch(with_kl_completions(items, []), pad_id=0, max_length=3)
    # slots 2 and 3: each prompt with the next item's completion, cut to max_length
    assert scored(batch) == [[3, 5], [6, 7], [6, 7], [3]]

from __future__ import annotations

import pytest
from support import TRAIN

from alignkit.chat_templates import resolve_template
from alignkit.config import DataConfig, DataSource
from alignkit.data.formats import Conversation, PreferencePair
from alignkit.data.sources import load_source
from alignkit.data.tokenize import plan_truncation, tokenize_examples, tokenize_pair
from alignkit.errors import AlignkitError


def test_plan_truncation_hand_worked():
    # fits: nothing cut
    assert plan_truncation(100, 200, 1024, 512, "truncate_prompt_left") == (100, 200)
    # long prompt, short completion: keep 1024 - 100 = 924 prompt tokens (more than 512)
    assert plan_truncation(1000, 100, 1024, 512, "truncate_prompt_left") == (924, 100)
    # both long: prompt floor of 512, completion gets the remaining 512
    assert plan_truncation(1000, 2000, 1024, 512, "truncate_prompt_left") == (512, 512)
    # short prompt, long completion: prompt whole, completion cut to 1024 - 100
    assert plan_truncation(100, 2000, 1024, 512, "truncate_prompt_left") == (100, 924)
    assert plan_truncation(1000, 100, 1024, 512, "drop") is None


@pytest.fixture(scope="module")
def ultrafeedback():
    pairs, _ = load_source(DataSource(path=str(TRAIN / "ultrafeedback_binarized_1k.jsonl")))
    return pairs


def test_prefix_property_holds_for_every_ultrafeedback_pair(smol_tokenizer, ultrafeedback):
    template = resolve_template(None, smol_tokenizer)
    eot = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    unlimited = DataConfig(max_length=1 << 20)
    tokenized, report = tokenize_examples(ultrafeedback, smol_tokenizer, template, unlimited)
    assert report.kept == len(ultrafeedback) == 994
    assert report.retokenized_at_boundary == 0 and report.truncated == 0
    for pair, tok in zip(ultrafeedback, tokenized, strict=True):
        for completion, ids in ((pair.chosen, tok.chosen_ids), (pair.rejected, tok.rejected_ids)):
            messages = pair.prompt + completion
            joint = smol_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            # prompt + completion ids == the template's own ids, minus the trailing newline
            assert tok.prompt_ids + ids == joint[:-1]
            assert ids[-1] == eot and ids.count(eot) == 1  # end-of-turn exactly once
        # <|im_start|> opens the default system turn, the user turn and the assistant header: no doubling
        assert tok.prompt_ids.count(smol_tokenizer.bos_token_id) == 3


def test_truncation_counts_are_right(smol_tokenizer, ultrafeedback):
    template = resolve_template(None, smol_tokenizer)
    full, _ = tokenize_examples(
        ultrafeedback, smol_tokenizer, template, DataConfig(max_length=1 << 20)
    )
    totals = [len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) for t in full]
    over = sum(total > 512 for total in totals)
    assert over > 0
    cut, report = tokenize_examples(
        ultrafeedback, smol_tokenizer, template, DataConfig(max_length=512)
    )
    assert report.truncated == over and report.kept == len(full)
    assert max(len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) for t in cut) <= 512
    # prompts keep their end: the generation prompt is always last
    assert all(t.prompt_ids[-3:] == full[0].prompt_ids[-3:] for t in cut)
    dropped, drop_report = tokenize_examples(
        ultrafeedback, smol_tokenizer, template, DataConfig(max_length=512, truncation="drop")
    )
    assert drop_report.dropped["longer than max_length"] == over
    assert len(dropped) == len(full) - over


def test_sft_truncation_keeps_prompt_end_and_completion_start(smol_tokenizer):
    template = resolve_template(None, smol_tokenizer)
    conv = Conversation(
        [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok " * 100}]
    )
    cfg = DataConfig(max_length=64, max_prompt_length=16)
    (example,), report = tokenize_examples([conv], smol_tokenizer, template, cfg)
    assert report.truncated == 1 and len(example.input_ids) == 64
    assert example.labels_mask[:16] == [False] * 16 and all(example.labels_mask[16:])


def test_end_of_turn_inside_text_is_dropped_with_a_count(smol_tokenizer):
    template = resolve_template(None, smol_tokenizer)
    pair = PreferencePair(
        [{"role": "user", "content": "q"}],
        [{"role": "assistant", "content": "a<|im_end|>b"}],
        [{"role": "assistant", "content": "c"}],
    )
    out, report = tokenize_examples([pair], smol_tokenizer, template, DataConfig())
    assert out == [] and report.dropped == {"end-of-turn marker inside the text": 1}


def test_multi_turn_prompt_pair(smol_tokenizer):
    template = resolve_template("chatml", smol_tokenizer)
    pair = PreferencePair(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
        [{"role": "assistant", "content": "yes"}],
        [{"role": "assistant", "content": "no"}],
    )
    tok, truncated, split = tokenize_pair(pair, smol_tokenizer, template, DataConfig())
    assert not truncated and not split
    assert smol_tokenizer.decode(tok.chosen_ids) == "yes<|im_end|>"
    assert smol_tokenizer.decode(tok.prompt_ids).endswith(
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prompt_limit_must_leave_room(smol_tokenizer):
    template = resolve_template(None, smol_tokenizer)
    with pytest.raises(AlignkitError, match="max_prompt_length"):
        tokenize_examples(
            [], smol_tokenizer, template, DataConfig(max_length=64, max_prompt_length=64)
        )

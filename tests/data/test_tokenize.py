from __future__ import annotations

import pytest
from support import TRAIN, published_template

from alignkit.chat_templates import resolve_template
from alignkit.config import DataConfig, DataSource
from alignkit.data.batching import IGNORE, pair_batch
from alignkit.data.formats import Conversation, Feedback, PreferencePair, from_hh_rlhf
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
    done = tokenize_pair(pair, smol_tokenizer, template, DataConfig())
    tok = done.item
    assert not done.truncated and not done.retokenized
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


# HH-RLHF rows whose conversations diverge before the last turn: at an assistant turn (the
# branches then hold user turns) and at a user turn (the branches start with one).
DIVERGE_AT_ASSISTANT = {
    "chosen": "\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: Another?\n\nAssistant: Pear.",
    "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: Rock.\n\nHuman: A fruit!\n\nAssistant: Stone.",
}
DIVERGE_AT_USER = {
    "chosen": "\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: Another?\n\nAssistant: Pear.",
    "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: A tree?\n\nAssistant: Oak.",
}


def scored_per_slot(pairs, layout: str) -> list[list[int]]:
    """The token ids the loss scores for each slot (chosen then rejected) of a pair batch."""
    batch = pair_batch(pairs, pad_id=0, layout=layout)
    return [
        batch.labels[(batch.owner == slot) & (batch.labels != IGNORE)].tolist()
        for slot in range(batch.slots)
    ]


@pytest.mark.parametrize("row", [DIVERGE_AT_ASSISTANT, DIVERGE_AT_USER], ids=["assistant", "user"])
@pytest.mark.parametrize("layout", ["padded", "flat", "shared"])
def test_multi_turn_branches_score_only_their_assistant_turns_chatml(smol_tokenizer, row, layout):
    template = resolve_template("chatml", smol_tokenizer)
    pair = from_hh_rlhf(row)
    (tok,), report = tokenize_examples([pair], smol_tokenizer, template, DataConfig())
    assert report.dropped == {}
    for completion, scored in zip(
        (pair.chosen, pair.rejected), scored_per_slot([tok], layout), strict=True
    ):
        replies = [m["content"] + "<|im_end|>" for m in completion if m["role"] == "assistant"]
        assert smol_tokenizer.decode(scored) == "".join(replies)
    # prompt + completion is the template's own rendering, up to the last <|im_end|>
    full = smol_tokenizer.apply_chat_template(
        pair.prompt + pair.chosen, chat_template=template.source, tokenize=False
    )
    assert smol_tokenizer.decode(tok.prompt_ids + tok.chosen_ids) + "\n" == full


def test_multi_turn_branches_never_score_user_turns_or_bos_llama2(smol_tokenizer):
    template = resolve_template("llama2", smol_tokenizer)  # BOS <|im_start|> opens each user turn
    pair = from_hh_rlhf(DIVERGE_AT_ASSISTANT)
    (tok,), report = tokenize_examples([pair], smol_tokenizer, template, DataConfig())
    assert report.dropped == {}
    for completion, scored in zip(
        (pair.chosen, pair.rejected), scored_per_slot([tok], "padded"), strict=True
    ):
        assert smol_tokenizer.bos_token_id not in scored
        replies = [f" {m['content']} <|im_end|>" for m in completion if m["role"] == "assistant"]
        assert smol_tokenizer.decode(scored) == "".join(replies)


def test_pairs_identical_after_truncation_are_dropped_and_counted(smol_tokenizer):
    template = resolve_template("chatml", smol_tokenizer)
    same_start = "Sure, here is a long and careful answer. " * 6
    pair = PreferencePair(
        [{"role": "user", "content": "Explain."}],
        [{"role": "assistant", "content": same_start + "Yes."}],
        [{"role": "assistant", "content": same_start + "No."}],
    )
    cfg = DataConfig(max_length=40, max_prompt_length=20)
    out, report = tokenize_examples([pair], smol_tokenizer, template, cfg)
    assert out == [] and report.dropped == {"identical after truncation": 1}
    out, report = tokenize_examples([pair], smol_tokenizer, template, DataConfig())
    assert len(out) == 1 and report.dropped == {}


SYSTEM = {"role": "system", "content": "You are terse."}
LONG_USER = {"role": "user", "content": "word " * 200}
LLAMA3_HEAD = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "You are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
)


def test_left_truncation_keeps_bos_and_system_turn_of_a_conversation(smol_tokenizer):
    template, tokenizer = published_template(smol_tokenizer, "llama3_1")
    conv = Conversation([SYSTEM, LONG_USER, {"role": "assistant", "content": "ok"}])
    cfg = DataConfig(max_length=80, max_prompt_length=60)
    (example,), report = tokenize_examples([conv], tokenizer, template, cfg)
    assert report.truncated == 1 and len(example.input_ids) <= 80
    text = tokenizer.decode(example.input_ids)
    # BOS and the system turn, then the end of the prompt: the oldest user words are cut
    assert text.startswith(LLAMA3_HEAD + " word word")
    assert text.endswith(
        "word word<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>"
    )
    assert text.count("word") < 200
    trained = [t for t, m in zip(example.input_ids, example.labels_mask, strict=True) if m]
    assert tokenizer.decode(trained) == "ok<|eot_id|>"


def test_left_truncation_keeps_bos_and_system_turn_of_a_pair_prompt(smol_tokenizer):
    template, tokenizer = published_template(smol_tokenizer, "llama3_1")
    pair = PreferencePair(
        [SYSTEM, LONG_USER],
        [{"role": "assistant", "content": "yes"}],
        [{"role": "assistant", "content": "no"}],
    )
    (tok,), report = tokenize_examples([pair], tokenizer, template, DataConfig(max_length=80))
    assert report.truncated == 1 and len(tok.prompt_ids) + len(tok.chosen_ids) <= 80
    prompt = tokenizer.decode(tok.prompt_ids)
    assert prompt.startswith(LLAMA3_HEAD + " word word")
    assert prompt.endswith("word word<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_system_turn_longer_than_the_prompt_budget_drops_the_row(smol_tokenizer):
    template, tokenizer = published_template(smol_tokenizer, "llama3_1")
    system = {"role": "system", "content": "Always be terse. " * 20}
    conv = Conversation([system, LONG_USER, {"role": "assistant", "content": "ok"}])
    out, report = tokenize_examples([conv], tokenizer, template, DataConfig(max_length=64))
    assert out == []
    assert report.dropped == {"BOS and system turn alone exceed the prompt budget": 1}


@pytest.mark.parametrize("name", ["qwen3", "mistral_v0_3"])
def test_pairs_on_templates_that_render_the_prompt_differently(smol_tokenizer, name):
    # Qwen3 shows <think> only on turns after the last user turn; Mistral puts the system
    # prompt into the last user turn. The prompt is what the template renders to generate.
    template, tokenizer = published_template(smol_tokenizer, name)
    prompt = [
        SYSTEM,
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add"},
        {"role": "user", "content": "3+3?"},
    ]
    chosen = [{"role": "assistant", "content": "6", "reasoning_content": "add again"}]
    rejected = [{"role": "assistant", "content": "7", "reasoning_content": "guess"}]
    items = [PreferencePair(prompt, chosen, rejected), Feedback(prompt, chosen, True)]
    (pair, feedback), report = tokenize_examples(items, tokenizer, template, DataConfig())
    assert report.dropped == {} and pair.chosen_mask is None
    generation = tokenizer.apply_chat_template(
        prompt, chat_template=template.source, tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(pair.prompt_ids) == generation
    assert feedback.prompt_ids == pair.prompt_ids and feedback.completion_ids == pair.chosen_ids
    end = {"qwen3": "<think>\nadd again\n</think>\n\n6<|im_end|>", "mistral_v0_3": " 6</s>"}
    assert tokenizer.decode(pair.chosen_ids) == end[name]

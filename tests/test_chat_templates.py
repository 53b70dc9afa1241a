from __future__ import annotations

import pytest

from alignkit.chat_templates import assistant_spans, render, resolve_template
from alignkit.config import DataConfig
from alignkit.data.formats import Conversation
from alignkit.data.tokenize import tokenize_conversation
from alignkit.errors import AlignkitError

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


# SmolLM2's own template adds a default system turn when there is none; plain ChatML does not,
# so the built-in is compared on a conversation that has its own system turn.
@pytest.mark.parametrize(
    ("spec", "messages"), [(None, MULTI_TURN), (None, MULTI_TURN[1:]), ("chatml", MULTI_TURN)]
)
def test_chatml_matches_smollm2_apply_chat_template_token_for_token(smol_tokenizer, spec, messages):
    template = resolve_template(spec, smol_tokenizer)
    reference = smol_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    example, _ = tokenize_conversation(
        Conversation(messages), smol_tokenizer, template, DataConfig()
    )
    # our example stops right after the last <|im_end|>; the template adds a trailing "\n"
    assert reference[: len(example.input_ids)] == example.input_ids
    assert smol_tokenizer.decode(reference[len(example.input_ids) :]) == "\n"


def test_mask_covers_exactly_assistant_turns_and_end_of_turn(smol_tokenizer):
    template = resolve_template(None, smol_tokenizer)
    example, _ = tokenize_conversation(
        Conversation(MULTI_TURN), smol_tokenizer, template, DataConfig()
    )
    trained = [t for t, m in zip(example.input_ids, example.labels_mask, strict=True) if m]
    expected = smol_tokenizer("Hello!<|im_end|>4<|im_end|>", add_special_tokens=False)["input_ids"]
    assert trained == expected
    # and the untrained tokens are exactly everything else
    untrained = smol_tokenizer.decode(
        [t for t, m in zip(example.input_ids, example.labels_mask, strict=True) if not m]
    )
    assert untrained == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_train_on_prompt_trains_every_token(smol_tokenizer):
    template = resolve_template(None, smol_tokenizer)
    example, _ = tokenize_conversation(
        Conversation(MULTI_TURN), smol_tokenizer, template, DataConfig(train_on_prompt=True)
    )
    assert all(example.labels_mask)


@pytest.mark.parametrize(
    ("name", "prompt_text", "assistant_text"),
    [
        (
            "llama2",
            "<|im_start|>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST]",
            " Yo <|im_end|>",
        ),
        ("human_assistant", "You are terse.\n\n### Human: Hi\n\n### Assistant:", " Yo<|im_end|>"),
        (
            "alpaca",
            "You are terse.\n\n### Instruction:\nHi\n\n### Response:\n",
            "Yo<|im_end|>",
        ),
        (
            "chatml",
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            "Yo<|im_end|>",
        ),
    ],
)
def test_builtin_templates_render_and_locate_the_reply(
    smol_tokenizer, name, prompt_text, assistant_text
):
    # SmolLM2's bos token is <|im_start|> and its eos token <|im_end|>
    messages = [
        MULTI_TURN[0],
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]
    template = resolve_template(name, smol_tokenizer)
    assert render(messages[:2], template, smol_tokenizer, add_generation_prompt=True) == prompt_text
    text, spans = assistant_spans(messages, template, smol_tokenizer)
    assert [text[a:b] for a, b in spans] == [assistant_text]
    assert template.end_of_turn == "<|im_end|>"


def test_jinja_file_template(smol_tokenizer, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    template = resolve_template(str(path), smol_tokenizer)
    text, spans = assistant_spans(MULTI_TURN[1:3], template, smol_tokenizer)
    assert template.name == "mine" and [text[a:b] for a, b in spans] == ["Hello!<|im_end|>"]


def test_unknown_template_and_template_without_stop_token(smol_tokenizer, tmp_path):
    with pytest.raises(AlignkitError, match="Unknown chat template 'vicuna'"):
        resolve_template("vicuna", smol_tokenizer)
    path = tmp_path / "nostop.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(AlignkitError, match="could not learn to stop"):
        resolve_template(str(path), smol_tokenizer)

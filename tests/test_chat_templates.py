from __future__ import annotations

import pytest
from support import published_template

from alignkit.chat_templates import assistant_renderings, render, resolve_template
from alignkit.config import DataConfig
from alignkit.data.formats import Conversation
from alignkit.data.tokenize import TokenizedExample, tokenize_examples
from alignkit.errors import AlignkitError

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


def examples(messages, template, tokenizer, cfg=None) -> list[TokenizedExample]:
    out, report = tokenize_examples(
        [Conversation(messages)], tokenizer, template, cfg or DataConfig()
    )
    assert report.dropped == {}
    return out


def trained_runs(ids: list[int], mask: list[bool], tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs: list[list[int]] = [[]]
    for token, trained in zip(ids, mask, strict=True):
        if trained:
            runs[-1].append(token)
        elif runs[-1]:
            runs.append([])
    return [tokenizer.decode(run) for run in runs if run]


# SmolLM2's own template adds a default system turn when there is none; plain ChatML does not,
# so the built-in is compared on a conversation that has its own system turn.
@pytest.mark.parametrize(
    ("spec", "messages"), [(None, MULTI_TURN), (None, MULTI_TURN[1:]), ("chatml", MULTI_TURN)]
)
def test_chatml_matches_smollm2_apply_chat_template_token_for_token(smol_tokenizer, spec, messages):
    template = resolve_template(spec, smol_tokenizer)
    reference = smol_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    (example,) = examples(messages, template, smol_tokenizer)
    # our example stops right after the last <|im_end|>; the template adds a trailing "\n"
    assert reference[: len(example.input_ids)] == example.input_ids
    assert smol_tokenizer.decode(reference[len(example.input_ids) :]) == "\n"


def test_mask_covers_exactly_assistant_turns_and_end_of_turn(smol_tokenizer):
    template = resolve_template(None, smol_tokenizer)
    (example,) = examples(MULTI_TURN, template, smol_tokenizer)
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
    (example,) = examples(MULTI_TURN, template, smol_tokenizer, DataConfig(train_on_prompt=True))
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
    (rendering,) = assistant_renderings(messages, template, smol_tokenizer)
    assert [rendering.text[a:b] for a, b in rendering.spans] == [assistant_text]
    assert template.end_of_turn == "<|im_end|>"


def test_jinja_file_template(smol_tokenizer, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    template = resolve_template(str(path), smol_tokenizer)
    (rendering,) = assistant_renderings(MULTI_TURN[1:3], template, smol_tokenizer)
    assert template.name == "mine"
    assert [rendering.text[a:b] for a, b in rendering.spans] == ["Hello!<|im_end|>"]


def test_unknown_template_and_template_without_stop_token(smol_tokenizer, tmp_path):
    with pytest.raises(AlignkitError, match="Unknown chat template 'vicuna'"):
        resolve_template("vicuna", smol_tokenizer)
    path = tmp_path / "nostop.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(AlignkitError, match="could not learn to stop"):
        resolve_template(str(path), smol_tokenizer)


THREE_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four.", "reasoning_content": "2+2=4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six.", "reasoning_content": "3+3=6."},
]
ASSISTANT_TURNS = [2, 4, 6]

# Each assistant turn as the template renders it when it is generated, end-of-turn included.
REPLY = {
    "qwen3": lambda m: f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}<|im_end|>",
    "llama3_1": lambda m: m["content"] + "<|eot_id|>",
    "gemma3": lambda m: m["content"] + "<end_of_turn>",
    "mistral_v0_3": lambda m: " " + m["content"] + "</s>",
    "phi3": lambda m: m["content"] + "<|end|>",
}
# Qwen3 drops the <think> blocks of earlier turns and Mistral moves the system prompt to the
# last user turn: each turn is then trained in its own example.
SPLIT = {"qwen3", "mistral_v0_3"}


def without(text: str, pieces: list[str]) -> str:
    """`text` with each piece removed, in order."""
    rest, cursor = "", 0
    for piece in pieces:
        at = text.index(piece, cursor)
        rest, cursor = rest + text[cursor:at], at + len(piece)
    return rest + text[cursor:]


@pytest.mark.parametrize("name", sorted(REPLY))
def test_published_template_trains_each_turn_exactly_as_the_template_renders_it(
    smol_tokenizer, name
):
    template, tokenizer = published_template(smol_tokenizer, name)
    groups = [[k] for k in ASSISTANT_TURNS] if name in SPLIT else [ASSISTANT_TURNS]
    out, report = tokenize_examples([Conversation(THREE_TURNS)], tokenizer, template, DataConfig())
    assert len(out) == len(groups) and report.dropped == {}
    assert (report.split_rows, report.split_examples) == ((1, 3) if name in SPLIT else (0, 0))
    for example, turns in zip(out, groups, strict=True):
        replies = [REPLY[name](THREE_TURNS[k]) for k in turns]
        assert trained_runs(example.input_ids, example.labels_mask, tokenizer) == replies
        # the example is the template's own text: the context it generates the last
        # trained turn from (system prompt included), then that turn
        context = tokenizer.apply_chat_template(
            THREE_TURNS[: turns[-1]],
            chat_template=template.source,
            tokenize=False,
            add_generation_prompt=True,
        )
        text = context + replies[-1]
        assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert "You are terse." in context
        untrained = [
            t for t, m in zip(example.input_ids, example.labels_mask, strict=True) if not m
        ]
        assert tokenizer.decode(untrained) == without(text, replies)


def test_generation_blocks_mark_the_trained_tokens(smol_tokenizer):
    template, tokenizer = published_template(smol_tokenizer, "qwen3_training")
    (example,) = examples(THREE_TURNS, template, tokenizer)
    replies = [REPLY["qwen3"](THREE_TURNS[k]) for k in ASSISTANT_TURNS]
    # the training template keeps every <think> block, so all turns share one example
    assert trained_runs(example.input_ids, example.labels_mask, tokenizer) == replies
    marked = tokenizer.apply_chat_template(
        THREE_TURNS,
        chat_template=template.source,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert marked["input_ids"][: len(example.input_ids)] == example.input_ids
    # transformers' mask is the same, plus the newline each block keeps after <|im_end|>
    theirs = trained_runs(marked["input_ids"], marked["assistant_masks"], tokenizer)
    assert theirs == [reply + "\n" for reply in replies]


def test_generation_block_must_hold_the_end_of_turn_marker(smol_tokenizer, tmp_path):
    path = tmp_path / "content_only.jinja"
    path.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    )
    template = resolve_template(str(path), smol_tokenizer)
    with pytest.raises(AlignkitError, match="leave out the end-of-turn marker <\\|im_end\\|>"):
        assistant_renderings(MULTI_TURN, template, smol_tokenizer)


def test_template_whose_reply_cannot_be_located_is_refused(smol_tokenizer, tmp_path):
    # the generation prompt ends with '>>', which the rendered reply does not follow
    path = tmp_path / "lost.jinja"
    path.write_text(
        "{% for m in messages %}{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}>>{% endif %}"
    )
    template = resolve_template(str(path), smol_tokenizer)
    with pytest.raises(AlignkitError, match="does not render turn 1 after the text"):
        assistant_renderings(MULTI_TURN[1:3], template, smol_tokenizer)


@pytest.mark.parametrize(
    ("name", "end_of_turn"),
    [("llama3_1", "<|eot_id|>"), ("gemma3", "<end_of_turn>"), ("phi3", "<|end|>")],
)
def test_turn_markers_the_tokenizer_lacks_are_added_as_single_tokens(
    smol_tokenizer, name, end_of_turn
):
    import copy

    from support import TEMPLATES

    tokenizer = copy.deepcopy(smol_tokenizer)
    assert end_of_turn not in tokenizer.get_vocab()
    template = resolve_template(str(TEMPLATES / f"{name}.jinja"), tokenizer)
    assert template.end_of_turn == end_of_turn and end_of_turn in template.added_tokens
    ids = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.convert_tokens_to_ids(end_of_turn)]
    again = resolve_template(str(TEMPLATES / f"{name}.jinja"), tokenizer)
    assert again.added_tokens == ()  # only what was missing is ever added

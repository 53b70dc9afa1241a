"""The fast paths of tokenization give exactly what the public calls give: prefixes rendered
through the compiled template equal `apply_chat_template`'s, and texts encoded by the fast
tokenizer's backend equal calling the tokenizer."""

from __future__ import annotations

import copy

import pytest
from support import published_template

from alignkit.chat_templates import BUILTIN_TEMPLATES, prefix_renderer, render, resolve_template
from alignkit.data.tokenize import encode_texts, plain_backend

CONVERSATIONS = {
    "system_two_turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    "reasoning_and_none": [
        {"role": "user", "content": "Why?", "name": None},
        {"role": "assistant", "content": "Because.", "reasoning": "Think first."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "<think>\nold\n</think>\n\nThen.", "thinking": None},
    ],
    "assistant_first": [
        {"role": "assistant", "content": "I speak first."},
        {"role": "user", "content": "Fine."},
        {"role": "assistant", "content": "Good."},
    ],
}
PUBLISHED = ["qwen3", "qwen3_training", "llama3_1", "gemma3", "mistral_v0_3", "phi3"]


def outcome(call, *args):
    """A call's text, or the type and message of what it raised."""
    try:
        return call(*args)
    except Exception as error:  # a template may refuse a prefix; both paths must agree
        return (type(error).__name__, str(error))


@pytest.mark.parametrize("name", ["tokenizer", *BUILTIN_TEMPLATES, *PUBLISHED])
def test_prefixes_render_as_apply_chat_template(smol_tokenizer, name):
    if name in PUBLISHED:
        template, tokenizer = published_template(smol_tokenizer, name)
    else:
        tokenizer = smol_tokenizer
        template = resolve_template(None if name == "tokenizer" else name, tokenizer)
    for messages in CONVERSATIONS.values():
        render_prefix = prefix_renderer(messages, template, tokenizer)
        for k in range(len(messages) + 1):
            for generation in (True, False):
                expected = outcome(render, messages[:k], template, tokenizer, generation)
                assert outcome(render_prefix, k, generation) == expected, (k, generation)


TEXTS = [
    "<|im_start|>user\nHello, wörld! 12345<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces and\ttabs\n\n",
    "",
    "emoji 🙂 and 中文",
]


def tokenizer_call(tokenizer, texts):
    out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [
        (list(ids), [tuple(o) for o in offsets])
        for ids, offsets in zip(out["input_ids"], out["offset_mapping"], strict=True)
    ]


def test_backend_encoding_equals_the_tokenizer_call(smol_tokenizer):
    assert plain_backend(smol_tokenizer) is not None
    encoded = encode_texts(TEXTS, smol_tokenizer)
    assert [(e.ids, list(e.offsets)) for e in encoded] == tokenizer_call(smol_tokenizer, TEXTS)


def test_backend_with_truncation_set_is_not_used(smol_tokenizer):
    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.backend_tokenizer.enable_truncation(max_length=3)
    assert plain_backend(tokenizer) is None
    encoded = encode_texts(TEXTS[:1], tokenizer)
    assert len(encoded[0].ids) > 3  # the tokenizer call does not truncate
    assert [(e.ids, list(e.offsets)) for e in encoded] == tokenizer_call(tokenizer, TEXTS[:1])


def test_split_special_tokens_is_honoured(smol_tokenizer):
    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.split_special_tokens = True
    (encoded,) = encode_texts(TEXTS[:1], tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in encoded.ids
    assert [(encoded.ids, list(encoded.offsets))] == tokenizer_call(tokenizer, TEXTS[:1])
    (again,) = encode_texts(TEXTS[:1], tokenizer)  # the backend now splits them too
    assert (again.ids, again.offsets) == (encoded.ids, encoded.offsets)

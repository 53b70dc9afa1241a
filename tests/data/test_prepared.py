"""Tokenization through `datasets` (cached Arrow files) gives exactly what the in-memory
list path gives: the same items, in order, as the same Python values, and the same counts."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
from support import published_template

import alignkit.data.prepared as prepared
from alignkit.chat_templates import resolve_template
from alignkit.config import DataConfig, DataSource
from alignkit.data.formats import Conversation, Feedback, PreferencePair, from_hh_rlhf
from alignkit.data.prepared import TokenizedRows, prepare_examples, tokenization_key
from alignkit.data.sources import load_source
from alignkit.data.tokenize import TokenizedExample, tokenize_examples
from alignkit.errors import AlignkitError

DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))


def turn(role: str, content: str, **extra: str) -> dict[str, str]:
    return {"role": role, "content": content, **extra}


def alpaca_conversations(n: int) -> list[Conversation]:
    """Shipped alpaca rows made into 1-3 turn conversations with a system prompt."""
    rows = [json.loads(line) for line in (DATA / "alpaca_en_demo_200.jsonl").open()]
    out = []
    for i in range(n):
        messages = [turn("system", "You are a helpful assistant.")]
        for j in range(1 + i % 3):
            row = rows[(7 * i + j) % len(rows)]
            messages += [turn("user", row["instruction"]), turn("assistant", row["output"])]
        out.append(Conversation(messages))
    return out


def ultrafeedback_pairs() -> list[PreferencePair]:
    pairs, _ = load_source(DataSource(path=str(DATA / "ultrafeedback_binarized_short_80.jsonl")))
    return pairs


SAME_START = "Sure, here is a long and careful answer. " * 6
EDGE_PAIRS = [
    from_hh_rlhf(
        {
            "chosen": "\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: Another?\n\nAssistant: Pear.",
            "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: Rock.\n\nHuman: A fruit!\n\nAssistant: Stone.",
        }
    ),
    PreferencePair(  # identical once truncated at max_length=128
        [turn("user", "Explain. " * 40)],
        [turn("assistant", SAME_START * 3 + "Yes.")],
        [turn("assistant", SAME_START * 3 + "No.")],
    ),
]
QWEN_CHAT = [
    turn("system", "You are terse."),
    turn("user", "Hi"),
    turn("assistant", "Hello!", reasoning_content="A greeting."),
    turn("user", "2+2?"),
    turn("assistant", "4", reasoning_content="Add."),
]


def case(name: str, smol_tokenizer):
    """(tokenizer, template, examples, data settings) of one named case."""
    smol = resolve_template(None, smol_tokenizer)
    if name == "sft_multi_turn_truncated":
        long_one = Conversation([turn("user", "word " * 300), turn("assistant", "ok")])
        return (
            smol_tokenizer,
            smol,
            [*alpaca_conversations(30), long_one],
            DataConfig(max_length=256),
        )
    if name == "sft_split_by_turn_qwen3":
        template, tokenizer = published_template(smol_tokenizer, "qwen3")
        convs = [Conversation(QWEN_CHAT), Conversation(QWEN_CHAT[:3]), *alpaca_conversations(6)]
        return tokenizer, template, convs, DataConfig(max_length=128)
    if name == "sft_dropped_llama3":
        template, tokenizer = published_template(smol_tokenizer, "llama3_1")
        system = turn("system", "Always be terse. " * 20)
        dropped = Conversation([system, turn("user", "word " * 200), turn("assistant", "ok")])
        return tokenizer, template, [*alpaca_conversations(5), dropped], DataConfig(max_length=64)
    if name == "sft_train_on_prompt":
        cfg = DataConfig(max_length=128, train_on_prompt=True)
        return smol_tokenizer, smol, alpaca_conversations(8), cfg
    if name == "pairs_truncated":
        pairs = [*ultrafeedback_pairs(), *EDGE_PAIRS]
        return smol_tokenizer, smol, pairs, DataConfig(max_length=128, max_prompt_length=48)
    if name == "pairs_dropped_too_long":
        cfg = DataConfig(max_length=128, truncation="drop")
        return smol_tokenizer, smol, [*ultrafeedback_pairs(), *EDGE_PAIRS], cfg
    if name == "feedback":
        items = [
            Feedback(p.prompt, p.chosen, i % 2 == 0) for i, p in enumerate(ultrafeedback_pairs())
        ]
        return smol_tokenizer, smol, items, DataConfig(max_length=128)
    raise KeyError(name)


CASES = [
    "sft_multi_turn_truncated",
    "sft_split_by_turn_qwen3",
    "sft_dropped_llama3",
    "sft_train_on_prompt",
    "pairs_truncated",
    "pairs_dropped_too_long",
    "feedback",
]


@pytest.mark.parametrize("name", CASES)
def test_prepared_rows_equal_the_list_path(smol_tokenizer, name):
    tokenizer, template, examples, cfg = case(name, smol_tokenizer)
    expected, expected_report = tokenize_examples(examples, tokenizer, template, cfg)
    rows, report = prepare_examples(examples, tokenizer, template, cfg)
    assert isinstance(rows, TokenizedRows) and len(rows) == len(expected)
    assert list(rows) == expected
    assert report == expected_report and report.summary() == expected_report.summary()
    # every case makes each change it is named for (not vacuously equal)
    assert report.truncated or report.dropped or report.split_rows or cfg.train_on_prompt
    # plain Python values, as the batching code reads them
    first = rows[0]
    for value in dataclasses.astuple(first):
        if isinstance(value, list):
            assert all(type(v) in (int, bool) for v in value)


def test_counts_of_each_change_match(smol_tokenizer):
    tokenizer, template, examples, cfg = case("sft_split_by_turn_qwen3", smol_tokenizer)
    _, report = prepare_examples(examples[:2], tokenizer, template, cfg)
    assert (report.rows, report.split_rows, report.split_examples, report.kept) == (2, 1, 2, 3)
    tokenizer, template, examples, cfg = case("pairs_truncated", smol_tokenizer)
    _, report = prepare_examples(examples, tokenizer, template, cfg)
    assert report.dropped == {"identical after truncation": 1} and report.truncated > 10


def test_several_workers_give_the_same_rows(smol_tokenizer, monkeypatch):
    tokenizer, template, examples, cfg = case("sft_multi_turn_truncated", smol_tokenizer)
    single, report = prepare_examples(examples, tokenizer, template, cfg)
    monkeypatch.setattr(prepared, "ROWS_PER_PROC", 4)
    shards = list(Path(prepared.cache_path("x").parent).glob("*_of_00002.arrow"))
    assert shards == []
    changed = dataclasses.replace(cfg, max_length=255, num_proc=2)  # a new key: tokenized again
    parallel, parallel_report = prepare_examples(examples, tokenizer, template, changed)
    expected, expected_report = tokenize_examples(examples, tokenizer, template, changed)
    assert list(parallel) == expected and parallel_report == expected_report
    assert len(list(prepared.cache_path("x").parent.glob("*_of_00002.arrow"))) == 2


def test_second_run_reads_the_cache(smol_tokenizer, monkeypatch):
    tokenizer, template, examples, cfg = case("pairs_truncated", smol_tokenizer)
    first, first_report = prepare_examples(examples, tokenizer, template, cfg)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(prepared, "outcome_columns", no_tokenizing)
    again, again_report = prepare_examples(examples, tokenizer, template, cfg)
    assert list(again) == list(first) and again_report == first_report
    assert Path(again.dataset.cache_files[0]["filename"]).parent == prepared.cache_path("x").parent
    with pytest.raises(AssertionError, match="tokenized again"):  # a new setting misses
        prepare_examples(examples, tokenizer, template, dataclasses.replace(cfg, max_length=127))


def test_key_changes_with_everything_that_changes_the_result(smol_tokenizer):
    template = resolve_template(None, smol_tokenizer)
    cfg = DataConfig(max_length=128)
    key = tokenization_key("data", smol_tokenizer, template, cfg)
    added = copy.deepcopy(smol_tokenizer)
    added.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    chatml = resolve_template("chatml", smol_tokenizer)
    others = [
        tokenization_key("other data", smol_tokenizer, template, cfg),
        tokenization_key("data", added, template, cfg),
        tokenization_key("data", smol_tokenizer, chatml, cfg),
        tokenization_key("data", smol_tokenizer, template, DataConfig(max_length=129)),
        tokenization_key(
            "data", smol_tokenizer, template, DataConfig(max_length=128, max_prompt_length=9)
        ),
        tokenization_key(
            "data", smol_tokenizer, template, DataConfig(max_length=128, truncation="drop")
        ),
        tokenization_key(
            "data", smol_tokenizer, template, DataConfig(max_length=128, train_on_prompt=True)
        ),
    ]
    assert len({key, *others}) == len(others) + 1
    # the same inputs give the same key, whatever the worker count and after use
    smol_tokenizer("some text", return_offsets_mapping=True)
    same = tokenization_key(
        "data", smol_tokenizer, template, DataConfig(max_length=128, num_proc=3)
    )
    assert same == key


def test_key_covers_the_tokenization_code(smol_tokenizer, monkeypatch, tmp_path):
    template = resolve_template(None, smol_tokenizer)
    key = tokenization_key("data", smol_tokenizer, template, DataConfig())
    edited = tmp_path / "tokenize.py"
    edited.write_text(Path(prepared.tokenize.__file__).read_text() + "\n# edited\n")
    monkeypatch.setattr(prepared.tokenize, "__file__", str(edited))
    assert tokenization_key("data", smol_tokenizer, template, DataConfig()) != key


def test_rows_read_like_a_list(smol_tokenizer):
    tokenizer, template, examples, cfg = case("sft_dropped_llama3", smol_tokenizer)
    expected, _ = tokenize_examples(examples, tokenizer, template, cfg)
    rows, _ = prepare_examples(examples, tokenizer, template, cfg)
    assert rows[-1] == expected[-1] and rows[1:3] == expected[1:3]
    assert isinstance(rows[0], TokenizedExample)
    assert list(rows.subset([2, 0])) == [expected[2], expected[0]]
    with pytest.raises(IndexError):
        rows[len(expected)]


def test_a_template_error_is_raised_as_in_the_list_path(smol_tokenizer):
    tokenizer, template, examples, cfg = case("sft_multi_turn_truncated", smol_tokenizer)
    broken = dataclasses.replace(template, source="{{ raise_exception('no chats here') }}")
    with pytest.raises(Exception, match="no chats here") as listed:
        tokenize_examples(examples, tokenizer, broken, cfg)
    with pytest.raises(listed.type, match="no chats here"):
        prepare_examples(examples, tokenizer, broken, cfg)


def test_no_examples_give_no_rows(smol_tokenizer):
    template = resolve_template(None, smol_tokenizer)
    rows, report = prepare_examples([], smol_tokenizer, template, DataConfig())
    assert len(rows) == 0 and report.rows == 0 and report.kept == 0


def test_prompt_limit_is_checked_first(smol_tokenizer):
    template = resolve_template(None, smol_tokenizer)
    cfg = DataConfig(max_length=64, max_prompt_length=64)
    with pytest.raises(AlignkitError, match="max_prompt_length"):
        prepare_examples(alpaca_conversations(2), smol_tokenizer, template, cfg)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sharegpt_rows(n: int, answer: str = "It is {i}.") -> list[dict]:
    return [
        {
            "conversations": [
                {"from": "human", "value": f"What is {i}?"},
                {"from": "gpt", "value": answer.format(i=i)},
            ]
        }
        for i in range(n)
    ] + [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}]


def no_reading(*args, **kwargs):
    raise AssertionError("read the sources again")


def test_prepared_sources_are_loaded_without_reading_them(smol_tokenizer, tmp_path, monkeypatch):
    template = resolve_template(None, smol_tokenizer)
    cfg = DataConfig(max_length=24)
    train = [DataSource(str(write_rows(tmp_path / "a.jsonl", sharegpt_rows(9, "x " * 30))))]
    first = prepared.prepare_sources(train, ("sft",), smol_tokenizer, template, cfg)
    assert first.report.truncated and first.sources[0].skipped  # counts worth comparing
    assert len(list(prepared.manifest_path("x").parent.glob("*.sources.json"))) == 1
    key = prepared.sources_key(train, smol_tokenizer, template, cfg)  # one key, named once
    assert [Path(f["filename"]) for f in first.rows.dataset.cache_files] == [
        prepared.cache_path(key)
    ]

    monkeypatch.setattr(prepared, "load_mixture", no_reading)
    again = prepared.prepare_sources(train, ("sft",), smol_tokenizer, template, cfg)
    assert list(again.rows) == list(first.rows) and again.rows.kind == first.rows.kind
    assert again.report == first.report and again.sources == first.sources
    # the wrong kind for the stage is still refused, naming the option
    with pytest.raises(AlignkitError, match=r"pair data; .*a\.jsonl holds sft.*data\.eval_sources"):
        prepared.prepare_sources(
            train, ("pair",), smol_tokenizer, template, cfg, "data.eval_sources"
        )


def test_changed_files_or_settings_are_read_again(smol_tokenizer, tmp_path, monkeypatch):
    template = resolve_template(None, smol_tokenizer)
    cfg = DataConfig(max_length=64)
    path = write_rows(tmp_path / "a.jsonl", sharegpt_rows(4))
    train = [DataSource(str(path))]
    prepared.prepare_sources(train, ("sft",), smol_tokenizer, template, cfg)
    calls = []
    real = prepared.load_mixture

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepared, "load_mixture", counted)
    stat = path.stat()
    write_rows(path, sharegpt_rows(4, "It is {i}!"))  # same size and time, other bytes
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    changed = prepared.prepare_sources(train, ("sft",), smol_tokenizer, template, cfg)
    assert len(calls) == 1
    assert "It is 0!" in smol_tokenizer.decode(changed.rows[0].input_ids)
    for other in (
        [DataSource(str(path), split="train[:2]")],
        [DataSource(str(path)), DataSource(str(path), weight=0.5)],
    ):
        prepared.prepare_sources(other, ("sft",), smol_tokenizer, template, cfg)
    prepared.prepare_sources(train, ("sft",), smol_tokenizer, template, replace_seed(cfg))
    assert len(calls) == 4


def replace_seed(cfg: DataConfig) -> DataConfig:
    return dataclasses.replace(cfg, seed=cfg.seed + 1)


def test_a_manifest_naming_lost_files_is_rebuilt(smol_tokenizer, tmp_path, monkeypatch):
    template = resolve_template(None, smol_tokenizer)
    cfg = DataConfig(max_length=64)
    train = [DataSource(str(write_rows(tmp_path / "a.jsonl", sharegpt_rows(4))))]
    first = prepared.prepare_sources(train, ("sft",), smol_tokenizer, template, cfg)
    (manifest,) = prepared.manifest_path("x").parent.glob("*.sources.json")
    for arrow in prepared.cache_path("x").parent.glob("*.arrow"):
        arrow.unlink()
    again = prepared.prepare_sources(train, ("sft",), smol_tokenizer, template, cfg)
    assert list(again.rows) == list(first.rows)
    manifest.write_text("{not json", encoding="utf-8")  # a torn or foreign file
    assert list(prepared.prepare_sources(train, ("sft",), smol_tokenizer, template, cfg).rows)
    assert json.loads(manifest.read_text())["examples"] == 4  # the empty row is skipped
    assert not list(manifest.parent.glob(".tmp-*"))


def test_hub_sources_have_no_manifest(smol_tokenizer, tmp_path):
    template = resolve_template(None, smol_tokenizer)
    local = DataSource(str(write_rows(tmp_path / "a.jsonl", sharegpt_rows(2))))
    cfg = DataConfig()
    assert prepared.sources_key([local], smol_tokenizer, template, cfg)
    hub = DataSource("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")
    assert prepared.sources_key([local, hub], smol_tokenizer, template, cfg) is None

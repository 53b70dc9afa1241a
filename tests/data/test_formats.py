from __future__ import annotations

import gzip
import json

import pytest
from support import TRAIN, write_jsonl

from alignkit.config import DataSource
from alignkit.data.formats import Conversation, Feedback, PreferencePair, detect_format, parse_hh
from alignkit.data.sources import load_mixture, load_source, read_local
from alignkit.errors import AlignkitError


@pytest.mark.parametrize(
    ("name", "fmt", "kind", "rows"),
    [
        ("alpaca_5000.json", "alpaca", Conversation, 5000),
        ("llamafactory_alpaca_en_demo.json", "alpaca", Conversation, 999),
        ("llamafactory_dpo_en_demo.json", "sharegpt_pair", PreferencePair, 300),
        ("llamafactory_kto_en_demo.json", "feedback", Feedback, 300),
        ("ultrafeedback_binarized_1k.jsonl", "preference", PreferencePair, 1000),
    ],
)
def test_shared_files_detect_and_convert(name, fmt, kind, rows):
    examples, report = load_source(DataSource(path=str(TRAIN / name)))
    assert report.format == fmt and report.rows == rows
    assert report.used + sum(report.skipped.values()) == rows
    assert all(isinstance(e, kind) for e in examples)


def test_alpaca_sample_joins_instruction_and_input():
    raw = json.loads((TRAIN / "alpaca_5000.json").read_text())[0]
    examples, _ = load_source(DataSource(path=str(TRAIN / "alpaca_5000.json"), split="train[:1]"))
    assert examples[0].messages == [
        {"role": "user", "content": f"{raw['instruction']}\n\n{raw['input']}"},
        {"role": "assistant", "content": raw["output"]},
    ]


def test_ultrafeedback_skips_are_counted_not_silent():
    _, report = load_source(DataSource(path=str(TRAIN / "ultrafeedback_binarized_1k.jsonl")))
    rows = [json.loads(line) for line in (TRAIN / "ultrafeedback_binarized_1k.jsonl").open()]
    identical = sum(r["chosen"] == r["rejected"] for r in rows)
    assert report.skipped["chosen and rejected are identical"] == identical == 4
    assert report.used == 1000 - sum(report.skipped.values())


def test_openhermes_sharegpt_record():
    record = {
        "conversations": [
            {"from": "system", "value": "You are Hermes."},
            {"from": "human", "value": "Name a prime.", "weight": None},
            {"from": "gpt", "value": "7", "weight": 1.0},
        ],
        "source": "airoboros2.2",
    }
    conv = detect_format(record).convert(record)
    assert conv.messages == [
        {"role": "system", "content": "You are Hermes."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
    ]


def test_orca_dpo_pairs_record():
    record = {"system": "Be brief.", "question": "2+2?", "chosen": "4", "rejected": "5"}
    pair = detect_format(record).convert(record)
    assert detect_format(record).name == "orca_dpo"
    assert pair.prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
    ]
    assert pair.chosen == [{"role": "assistant", "content": "4"}]
    assert pair.rejected == [{"role": "assistant", "content": "5"}]


def test_hh_rlhf_prompt_is_the_shared_prefix():
    record = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: A pun.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: No.",
    }
    fmt = detect_format(record)
    pair = fmt.convert(record)
    assert fmt.name == "hh_rlhf"
    assert [m["content"] for m in pair.prompt] == ["Hi", "Hello!", "Tell a joke"]
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.chosen == [{"role": "assistant", "content": "A pun."}]
    assert pair.rejected == [{"role": "assistant", "content": "No."}]
    assert parse_hh("\n\nHuman: a b\n\nAssistant:") == [
        {"role": "user", "content": "a b"},
        {"role": "assistant", "content": ""},
    ]


def test_ultrafeedback_message_lists_strip_the_prompt():
    prompt = "Say hi"
    record = {
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Hi!"}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "No."}],
    }
    pair = detect_format(record).convert(record)
    assert pair.prompt == [{"role": "user", "content": prompt}]
    assert pair.chosen == [{"role": "assistant", "content": "Hi!"}]


def test_messages_prompt_completion_and_feedback_records():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert detect_format({"messages": msgs}).convert({"messages": msgs}).messages == msgs
    pc = {"prompt": "q", "completion": "a"}
    assert detect_format(pc).convert(pc).messages == msgs
    fb = {"messages": msgs, "label": False}
    item = detect_format(fb).convert(fb)
    assert item == Feedback(msgs[:1], msgs[1:], False)


def test_assistant_messages_keep_their_reasoning_content(tmp_path):
    record = {
        "messages": [
            {"role": "user", "content": "2+2?", "reasoning_content": "ignored", "name": "x"},
            {"role": "assistant", "content": "4", "reasoning_content": "2+2=4", "id": 7},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6", "reasoning_content": None},
        ]
    }
    assert detect_format(record).convert(record).messages == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    record["messages"][1]["reasoning_content"] = ["2+2=4"]
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(AlignkitError, match=r"line 1: 'reasoning_content' of an assistant message"):
        load_source(DataSource(path=str(path)))


def test_missing_field_error_names_file_row_format_and_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}],
    )
    with pytest.raises(AlignkitError) as err:
        load_source(DataSource(path=str(path)))
    msg = str(err.value)
    assert str(path) in msg and "line 2" in msg and "missing field 'output'" in msg
    assert "format 'alpaca' needs fields instruction, output" in msg


def test_unknown_role_names_the_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "wizard", "content": "x"}]}])
    with pytest.raises(AlignkitError, match=r"line 1: unknown role 'wizard' in 'messages'"):
        load_source(DataSource(path=str(path)))


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": \n')
    with pytest.raises(AlignkitError, match=r"bad.jsonl: line 3 is not valid JSON"):
        load_source(DataSource(path=str(path)))


def test_unrecognised_fields_list_the_known_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(
        AlignkitError, match=r"(?s)fields \[text\], which match no known format.*alpaca"
    ):
        load_source(DataSource(path=str(path)))


def test_skips_are_errors_under_strict(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, report = load_source(DataSource(path=str(path)))
    assert examples == [] and report.skipped == {
        "chosen and rejected are identical": 1,
        "empty text in 'prompt'": 1,
    }
    with pytest.raises(AlignkitError, match="line 1: chosen and rejected are identical.*--strict"):
        load_source(DataSource(path=str(path)), strict=True)


def test_gz_csv_parquet_and_slicing(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    assert len(read_local(gz)) == 10
    assert [r["prompt"] for _, r in read_local(gz, "train[2:4]")] == ["q2", "q3"]
    assert len(read_local(gz, "train[:50%]")) == 5
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(10)))
    assert read_local(csv_path, "train[-3:]")[0][1] == {"prompt": "q7", "completion": "a7"}
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    examples, report = load_source(DataSource(path=str(tmp_path / "d.parquet")))
    assert report.format == "prompt_completion" and len(examples) == 10


def test_local_dataset_folder_goes_through_datasets(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(
        folder / "train.jsonl",
        [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(6)],
    )
    examples, report = load_source(DataSource(path=str(folder), split="train[:4]"))
    assert report.format == "preference" and len(examples) == 4


def test_unreachable_hub_dataset_says_offline():
    with pytest.raises(AlignkitError, match="looks offline.*local .json"):
        load_source(DataSource(path="no-such-org/no-such-dataset"))


def test_mixture_weights_take_fractions_and_repeats(tmp_path):
    a = write_jsonl(
        tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(10)]
    )
    b = write_jsonl(
        tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(4)]
    )
    mixed, reports = load_mixture([DataSource(str(a), weight=0.5), DataSource(str(b), weight=2.0)])
    prompts = [e.messages[0]["content"] for e in mixed]
    assert sum(p.startswith("a") for p in prompts) == 5
    assert sorted(p for p in prompts if p.startswith("b")) == sorted(
        [f"b{i}" for i in range(4)] * 2
    )
    assert [r.used for r in reports] == [5, 8]
    again, _ = load_mixture([DataSource(str(a), weight=0.5), DataSource(str(b), weight=2.0)])
    assert again == mixed  # seeded


def test_mixture_of_different_kinds_is_an_error(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "completion": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "y"}])
    with pytest.raises(AlignkitError, match="Cannot mix sft data"):
        load_mixture([DataSource(str(a)), DataSource(str(b))])


def test_line_separators_inside_json_strings_stay_in_their_row(tmp_path):
    text = "first\u2028second\u0085third\u2029"
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "Say it.", "output": text}, {"instruction": "Again.", "output": "x"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    examples, report = load_source(DataSource(path=str(path)))
    assert report.used == 2 and examples[0].messages[-1]["content"] == text

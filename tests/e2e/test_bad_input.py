"""Bad input, as a careless or hostile user gives it, through the public command line.

Every case must end with exit code 2 and no traceback, with a message that names what is
wrong and where (file, row or line, field or option), and must leave the workspace as it
was: no file written, changed or removed. Cases run in-process through `main`, so an
uncaught exception fails the case with its traceback.
"""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import make_tiny_llama, write_jsonl

from alignkit.cli import main

ALPACA = {"instruction": "Say hi.", "input": "", "output": "Hi."}
TAKEN = socket.socket()  # a loopback port in use, for `serve --port`
TAKEN.bind(("127.0.0.1", 0))
TAKEN.listen()
PAIR = {"prompt": "Say hi.", "chosen": "Hi.", "rejected": "No."}


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Path], list[str]]  # workspace -> command line
    expect: tuple[str, ...]  # substrings the error message must hold
    setup: Callable[[Path], object] | None = None  # writes the bad input into the workspace


def rows(name: str, records: list) -> Callable[[Path], object]:
    return lambda ws: write_jsonl(ws / name, records)


def raw(name: str, data: bytes) -> Callable[[Path], object]:
    return lambda ws: (ws / name).write_bytes(data)


def text(name: str, content: str) -> Callable[[Path], object]:
    return lambda ws: (ws / name).write_text(content, encoding="utf-8")


def inspect(name: str, *extra: str) -> Callable[[Path], list[str]]:
    return lambda ws: ["data", "inspect", str(ws / name), "--model", str(ws / "tiny"), *extra]


def data_case(id_: str, records: list, *expect: str, extra: tuple[str, ...] = ()) -> Case:
    """A data file with one bad row after a good one, through `alignkit data inspect`."""
    name = f"{id_}.jsonl"
    return Case(id_, inspect(name, *extra), (name, *expect), rows(name, records))


def alpaca(**fields) -> list[dict]:
    return [ALPACA, {**ALPACA, **fields}]


def sft(*extra: str) -> Callable[[Path], list[str]]:
    return lambda ws: [
        "sft",
        "--model",
        str(ws / "tiny"),
        "--data.sources",
        str(ws / "good.jsonl"),
        "--output-dir",
        str(ws / "out"),
        *[e.replace("{ws}", str(ws)) for e in extra],
    ]


def pref(*extra: str) -> Callable[[Path], list[str]]:
    return lambda ws: [
        "pref",
        "--model",
        str(ws / "tiny"),
        "--data.sources",
        str(ws / "pairs.jsonl"),
        "--output-dir",
        str(ws / "out"),
        *[e.replace("{ws}", str(ws)) for e in extra],
    ]


def evaluate(*extra: str) -> Callable[[Path], list[str]]:
    """`alignkit eval` of the tiny model on one offline item."""
    base = ("eval", "{ws}/tiny", "--tasks", "arc_easy", "--limit", "1", "--offline")
    return plain(*base, *extra)


def plain(*argv: str) -> Callable[[Path], list[str]]:
    return lambda ws: [a.replace("{ws}", str(ws)) for a in argv]


DATA_CASES = [
    data_case("alpaca-input-number", alpaca(input=3), "line 2", "'input'", "string"),
    data_case("alpaca-system-number", alpaca(system=1.5), "line 2", "'system'", "string"),
    data_case("alpaca-instruction-number", alpaca(instruction=7), "line 2", "'instruction'"),
    data_case("alpaca-output-list", alpaca(output=["a"]), "line 2", "'output'"),
    data_case("alpaca-history-strings", alpaca(history=["hi", "yo"]), "line 2", "'history'"),
    data_case("alpaca-history-number", alpaca(history=[["hi", 3]]), "line 2", "'history'"),
    data_case("alpaca-history-object", alpaca(history={"a": "b"}), "line 2", "'history'"),
    data_case(
        "sharegpt-object",
        [{"conversations": {"from": "human", "value": "x"}}],
        "'conversations'",
        "list",
    ),
    data_case("sharegpt-string", [{"conversations": "hello"}], "'conversations'", "list"),
    data_case(
        "sharegpt-missing-value",
        [{"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]}],
        "'conversations'",
    ),
    data_case(
        "sharegpt-unknown-role",
        [{"conversations": [{"from": "alien", "value": "a"}, {"from": "gpt", "value": "b"}]}],
        "unknown role 'alien'",
    ),
    data_case(
        "sharegpt-value-number",
        [{"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "b"}]}],
        "'conversations'",
        "string",
    ),
    data_case("messages-not-list", [{"messages": "hi"}], "'messages'", "list"),
    data_case("messages-item-string", [{"messages": ["hi", "yo"]}], "'messages'", "object"),
    data_case(
        "messages-end-with-user",
        [{"messages": [{"role": "user", "content": "a"}]}],
        "'messages'",
        "assistant",
    ),
    data_case(
        "messages-no-user",
        [{"messages": [{"role": "assistant", "content": "a"}]}],
        "no user message",
    ),
    data_case(
        "messages-begin-with-assistant",
        [
            {
                "messages": [
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            }
        ],
        "line 1",
        "'messages'",
        "assistant",
    ),
    data_case("prompt-number", [{"prompt": 5, "completion": "x"}], "'prompt'"),
    data_case("completion-object", [{"prompt": "a", "completion": {"x": 1}}], "'completion'"),
    data_case("preference-chosen-number", [PAIR, {**PAIR, "chosen": 3}], "line 2", "'chosen'"),
    data_case(
        "preference-rejected-items", [PAIR, {**PAIR, "rejected": [1, 2]}], "line 2", "'rejected'"
    ),
    data_case(
        "preference-prompt-null", [PAIR, {**PAIR, "prompt": None}], "line 2", "'prompt'", "missing"
    ),
    data_case(
        "orca-question-number",
        [{"question": 1, "chosen": "a", "rejected": "b"}],
        "'question'",
    ),
    data_case(
        "orca-system-number",
        [{"system": 2, "question": "q", "chosen": "a", "rejected": "b"}],
        "'system'",
    ),
    data_case("hh-no-markers", [{"chosen": "hello", "rejected": "bye"}], "Human"),
    data_case("hh-chosen-number", [{"chosen": 3, "rejected": "bye"}], "'chosen'"),
    data_case(
        "sharegpt-pair-chosen-string",
        [{"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": "b"}],
        "'chosen'",
    ),
    data_case(
        "feedback-label-string",
        [
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ],
                "label": "yes",
            }
        ],
        "'label'",
    ),
    data_case(
        "feedback-ends-with-user",
        [{"messages": [{"role": "user", "content": "q"}], "label": True}],
        "'messages'",
    ),
    data_case("row-is-a-list", [ALPACA, [1, 2]], "line 2", "object"),
    data_case("row-is-a-number", [ALPACA, 3], "line 2", "object"),
    data_case("unknown-fields", [{"question_text": "x", "answer": "y"}], "match no known format"),
    data_case(
        "forced-format-missing-field", [ALPACA], "'conversations'", extra=("--format", "sharegpt")
    ),
    data_case(
        "unknown-format-name",
        [ALPACA],
        "Unknown data format 'alpacca'",
        extra=("--format", "alpacca"),
    ),
    data_case("bad-split", [ALPACA], "split", extra=("--split", "train[::2]")),
    data_case(
        "strict-empty-text", [ALPACA, {**ALPACA, "output": " "}], "empty text", extra=("--strict",)
    ),
    data_case(
        "strict-identical-pair",
        [PAIR, {**PAIR, "rejected": "Hi."}],
        "identical",
        extra=("--strict",),
    ),
    Case(
        "invalid-json-line",
        inspect("bad.jsonl"),
        ("bad.jsonl", "line 3", "not valid JSON"),
        text("bad.jsonl", json.dumps(ALPACA) + "\n" + json.dumps(ALPACA) + "\n{oops\n"),
    ),
    Case(
        "invalid-json-file",
        inspect("bad.json"),
        ("bad.json", "line 2", "not valid JSON"),
        text("bad.json", '[\n{"a": }\n]'),
    ),
    Case(
        "json-two-lists",
        inspect("two.json"),
        ("two.json", "one list"),
        text("two.json", json.dumps({"a": [ALPACA], "b": [ALPACA]})),
    ),
    Case(
        "json-scalar",
        inspect("scalar.json"),
        ("scalar.json", "list of records"),
        text("scalar.json", "3"),
    ),
    Case(
        "non-utf8-byte",
        inspect("bytes.jsonl"),
        ("bytes.jsonl", "line 2", "UTF-8"),
        raw(
            "bytes.jsonl",
            (json.dumps(ALPACA) + "\n").encode() + b'{"instruction": "caf\xe9", "output": "x"}\n',
        ),
    ),
    Case(
        "latin-1-file",
        inspect("latin.json"),
        ("latin.json", "line 1", "UTF-8"),
        raw(
            "latin.json",
            json.dumps([{**ALPACA, "output": "olé"}], ensure_ascii=False).encode("latin-1"),
        ),
    ),
    Case(
        "utf-16-file",
        inspect("wide.jsonl"),
        ("wide.jsonl", "UTF-16"),
        raw("wide.jsonl", (json.dumps(ALPACA) + "\n").encode("utf-16")),
    ),
    Case(
        "parquet-not-parquet",
        inspect("fake.parquet"),
        ("fake.parquet", "parquet"),
        text("fake.parquet", "not a parquet file"),
    ),
    Case(
        "gz-not-gzip",
        inspect("fake.jsonl.gz"),
        ("fake.jsonl.gz", "gzip"),
        text("fake.jsonl.gz", json.dumps(ALPACA)),
    ),
    Case(
        "truncated-gzip",
        inspect("cut.jsonl.gz"),
        ("cut.jsonl.gz", "gzip"),
        raw("cut.jsonl.gz", gzip.compress((json.dumps(ALPACA) + "\n").encode() * 50)[:40]),
    ),
    Case(
        "csv-unknown-fields",
        inspect("d.csv"),
        ("d.csv", "match no known format"),
        text("d.csv", "a,b\n1,2\n"),
    ),
    Case(
        "empty-file", inspect("empty.jsonl"), ("empty.jsonl", "no records"), text("empty.jsonl", "")
    ),
    Case(
        "unsupported-suffix",
        inspect("d.txt"),
        ("d.txt", "unsupported file type"),
        text("d.txt", "x"),
    ),
    Case("missing-file", inspect("nowhere.jsonl"), ("nowhere.jsonl", "does not exist"), None),
    Case(
        "directory-named-jsonl",
        inspect("dir.jsonl"),
        ("dir.jsonl", "is a directory"),
        lambda ws: (ws / "dir.jsonl").mkdir(),
    ),
]

OPTION_CASES = [
    Case(
        "max-length-zero",
        inspect("good.jsonl", "--max-length", "0"),
        ("data.max_length", "at least 2"),
    ),
    Case("max-length-negative", inspect("good.jsonl", "--max-length", "-5"), ("data.max_length",)),
    Case(
        "max-length-text",
        inspect("good.jsonl", "--max-length", "long"),
        ("data.max_length", "integer"),
    ),
    Case(
        "prompt-longer-than-max",
        inspect("good.jsonl", "--max-length", "64", "--max-prompt-length", "64"),
        ("data.max_prompt_length", "data.max_length"),
    ),
    Case(
        "truncation-unknown",
        inspect("good.jsonl", "--truncation", "cut"),
        ("data.truncation", "drop"),
    ),
    Case(
        "strict-not-bool",
        inspect("good.jsonl", "--data.strict", "maybe"),
        ("data.strict", "true or false"),
    ),
    Case(
        "misspelt-key",
        inspect("good.jsonl", "--data.max_lenght", "5"),
        ("data.max_lenght", "data.max_length"),
    ),
    Case(
        "unknown-template-name", inspect("good.jsonl", "--chat-template", "chatmll"), ("chatmll",)
    ),
    Case(
        "missing-template-file",
        inspect("good.jsonl", "--chat-template", "nope.jinja"),
        ("nope.jinja",),
    ),
    Case(
        "learning-rate-negative",
        sft("--train.learning_rate", "-1e-3"),
        ("train.learning_rate", "above 0"),
    ),
    Case(
        "micro-batch-zero",
        sft("--train.micro_batch_size", "0"),
        ("train.micro_batch_size", "at least 1"),
    ),
    Case(
        "micro-batch-negative", sft("--train.micro_batch_size", "-2"), ("train.micro_batch_size",)
    ),
    Case(
        "accumulation-zero",
        sft("--train.gradient_accumulation_steps", "0"),
        ("train.gradient_accumulation_steps",),
    ),
    Case(
        "lora-rank-zero", sft("--model.adapter", "lora", "--lora.r", "0"), ("lora.r", "at least 1")
    ),
    Case("lora-alpha-zero", sft("--model.adapter", "lora", "--lora.alpha", "0"), ("lora.alpha",)),
    Case(
        "lora-dropout-one", sft("--model.adapter", "lora", "--lora.dropout", "1"), ("lora.dropout",)
    ),
    Case("device-tpu", sft("--model.device", "tpu"), ("model.device", "tpu")),
    Case("dtype-fp8", sft("--model.dtype", "fp8"), ("model.dtype", "float32")),
    Case(
        "no-steps-no-epochs",
        sft("--train.max_steps", "-1", "--train.epochs", "0"),
        ("train.max_steps",),
    ),
    Case("zero-epochs", sft("--train.epochs", "0"), ("train.epochs", "nothing would be trained")),
    Case(
        "warmup-ratio-negative", sft("--train.warmup_ratio", "-1"), ("train.warmup_ratio", "[0, 1]")
    ),
    Case("warmup-ratio-above-one", sft("--train.warmup_ratio", "1.5"), ("train.warmup_ratio",)),
    Case("warmup-steps-negative", sft("--train.warmup_steps", "-3"), ("train.warmup_steps",)),
    Case(
        "eval-fraction-above-one",
        sft("--train.eval_fraction", "1.5"),
        ("train.eval_fraction", "[0, 1)"),
    ),
    Case("weight-decay-negative", sft("--train.weight_decay", "-0.1"), ("train.weight_decay",)),
    Case("grad-norm-negative", sft("--train.max_grad_norm", "-1"), ("train.max_grad_norm",)),
    Case("save-limit-negative", sft("--train.save_total_limit", "-1"), ("train.save_total_limit",)),
    Case("logging-steps-zero", sft("--train.logging_steps", "0"), ("train.logging_steps",)),
    Case("logps-chunk-negative", sft("--train.logps_chunk", "-1"), ("train.logps_chunk",)),
    Case("scheduler-unknown", sft("--train.scheduler", "step"), ("train.scheduler", "cosine")),
    Case("report-to-unknown", sft("--train.report_to", "mlflow"), ("train.report_to",)),
    Case(
        "source-weight-zero",
        plain(
            "sft", "--model", "{ws}/tiny", "--config", "{ws}/weight0.yaml", "--output-dir", "{ws}/o"
        ),
        ("weight", "above 0"),
        text("weight0.yaml", "data:\n  sources:\n    - {path: good.jsonl, weight: 0}\n"),
    ),
    Case("config-missing", sft("--config", "{ws}/none.yaml"), ("none.yaml", "does not exist")),
    Case(
        "config-invalid-yaml",
        sft("--config", "{ws}/bad.yaml"),
        ("bad.yaml", "not valid YAML"),
        text("bad.yaml", "train: [oops\n"),
    ),
    Case(
        "config-top-level-list",
        sft("--config", "{ws}/list.yaml"),
        ("list.yaml", "mapping"),
        text("list.yaml", "- a\n- b\n"),
    ),
    Case(
        "config-unknown-section",
        sft("--config", "{ws}/sec.yaml"),
        ("trian", "sec.yaml"),
        text("sec.yaml", "trian:\n  epochs: 1\n"),
    ),
    Case(
        "config-unknown-key",
        sft("--config", "{ws}/key.yaml"),
        ("train.epoch", "train.epochs"),
        text("key.yaml", "train:\n  epoch: 1\n"),
    ),
    Case(
        "config-section-not-mapping",
        sft("--config", "{ws}/scalar.yaml"),
        ("train",),
        text("scalar.yaml", "train: 3\n"),
    ),
    Case("stray-argument", sft("stray"), ("stray",)),
    Case(
        "output-dir-is-a-file",
        sft("--output-dir", "{ws}/good.jsonl"),
        ("good.jsonl", "not a directory"),
    ),
    Case(
        "output-dir-not-empty",
        sft("--output-dir", "{ws}/full"),
        ("full", "not empty", "--overwrite"),
        lambda ws: (ws / "full").mkdir() or (ws / "full" / "mine.txt").write_text("keep"),
    ),
    Case(
        "output-dir-unwritable", sft("--output-dir", "/proc/alignkit-out"), ("/proc/alignkit-out",)
    ),
    Case(
        "overwrite-output-holding-the-data",
        sft("--output-dir", "{ws}", "--overwrite"),
        ("holds", "an input of this command"),
    ),
    Case(
        "overwrite-output-is-the-model",
        sft("--output-dir", "{ws}/tiny", "--overwrite"),
        ("tiny", "model"),
    ),
    Case(
        "sft-data-missing",
        sft("--data.sources", "{ws}/gone.jsonl"),
        ("gone.jsonl", "does not exist"),
    ),
    Case("sft-on-pair-data", sft("--data.sources", "{ws}/pairs.jsonl"), ("pairs.jsonl", "pair")),
    Case(
        "sft-no-data",
        lambda ws: ["sft", "--model", str(ws / "tiny"), "--output-dir", str(ws / "out")],
        ("data.sources",),
    ),
    Case(
        "empty-model-dir",
        sft("--model", "{ws}/emptymodel"),
        ("emptymodel",),
        lambda ws: (ws / "emptymodel").mkdir(),
    ),
    Case(
        "truncated-weights",
        sft("--model", "{ws}/cut"),
        ("cut", "model.safetensors"),
        lambda ws: truncated_model(ws),
    ),
    Case("model-is-a-text-file", sft("--model", "{ws}/good.jsonl"), ("good.jsonl", ".gguf")),
    Case("gguf-missing", sft("--model", "{ws}/m.gguf"), ("m.gguf", "does not exist")),
    Case(
        "adapter-config-invalid",
        sft("--model", "{ws}/badadapter"),
        ("adapter_config.json",),
        lambda ws: adapter_dir(ws, "badadapter", "{not json"),
    ),
    Case(
        "adapter-config-no-base",
        sft("--model", "{ws}/nobase"),
        ("base_model_name_or_path",),
        lambda ws: adapter_dir(ws, "nobase", json.dumps({"peft_type": "LORA"})),
    ),
    Case("pref-unknown-loss", pref("--loss", "dpoo"), ("pref.loss", "dpoo")),
    Case(
        "pref-weights-mismatch",
        pref("--loss", "sigmoid,ipo", "--loss-weights", "1"),
        ("pref.loss_weights",),
    ),
    Case("pref-beta-zero", pref("--beta", "0"), ("pref.beta",)),
    Case("pref-kto-combined", pref("--loss", "kto,sigmoid"), ("kto",)),
    Case("pref-packing", pref("--packing"), ("train.packing",)),
    Case(
        "pref-kto-precompute", pref("--loss", "kto", "--precompute-ref"), ("precompute_ref", "kto")
    ),
    Case(
        "pref-robust-smoothing",
        pref("--loss", "robust", "--label-smoothing", "0.7"),
        ("label_smoothing",),
    ),
    Case("pref-smoothing-above-one", pref("--label-smoothing", "2"), ("pref.label_smoothing",)),
    Case("pref-on-sft-data", pref("--data.sources", "{ws}/good.jsonl"), ("good.jsonl", "sft")),
    Case(
        "pref-on-adapter",
        pref("--model", "{ws}/nobase"),
        ("nobase",),
        lambda ws: adapter_dir(ws, "nobase", json.dumps({"peft_type": "LORA"})),
    ),
    Case(
        "merge-not-an-adapter",
        plain("merge", "{ws}/tiny", "--out", "{ws}/m"),
        ("tiny", "adapter_config.json"),
    ),
    Case("merge-missing-dir", plain("merge", "{ws}/nothing", "--out", "{ws}/m"), ("nothing",)),
    Case(
        "merge-out-is-a-file",
        plain("merge", "{ws}/adapter", "--out", "{ws}/good.jsonl"),
        ("good.jsonl", "not a directory"),
    ),
    Case(
        "merge-out-not-empty",
        plain("merge", "{ws}/adapter", "--out", "{ws}/full"),
        ("full", "not empty"),
        lambda ws: (ws / "full").mkdir() or (ws / "full" / "mine.txt").write_text("keep"),
    ),
    Case(
        "merge-out-is-the-adapter",
        plain("merge", "{ws}/adapter", "--out", "{ws}/adapter", "--overwrite"),
        ("adapter", "input"),
    ),
    Case(
        "merge-out-holds-the-adapter",
        plain("merge", "{ws}/adapter", "--out", "{ws}", "--overwrite"),
        ("adapter", "input"),
    ),
    Case(
        "merge-extra-settings",
        plain("merge", "{ws}/adapter", "--out", "{ws}/m", "lora.r=4"),
        ("merge",),
    ),
    Case(
        "chat-negative-tokens",
        plain("chat", "{ws}/tiny", "--prompt", "hi", "--max-new-tokens", "-4"),
        ("generation.max_new_tokens",),
    ),
    Case(
        "chat-negative-temperature",
        plain("chat", "{ws}/tiny", "--prompt", "hi", "--temperature", "-1"),
        ("generation.temperature",),
    ),
    Case(
        "chat-top-p-above-one",
        plain("chat", "{ws}/tiny", "--prompt", "hi", "--top-p", "2"),
        ("generation.top_p",),
    ),
    Case("chat-missing-model", plain("chat", "{ws}/nomodel", "--prompt", "hi"), ("nomodel",)),
    Case(
        "serve-port-out-of-range",
        plain("serve", "{ws}/tiny", "--port", "99999"),
        ("--port", "99999"),
    ),
    Case("serve-port-text", plain("serve", "{ws}/tiny", "--port", "http"), ("--port",)),
    Case(
        "export-not-a-gguf-path",
        plain("export", "{ws}/tiny", "--gguf", "{ws}/model.bin"),
        ("model.bin", ".gguf"),
    ),
    Case(
        "export-unknown-type",
        plain("export", "{ws}/tiny", "--gguf", "{ws}/m.gguf", "--type", "q4"),
        ("--type", "q4"),
    ),
    Case(
        "export-over-an-existing-file",
        plain("export", "{ws}/tiny", "--gguf", "{ws}/m.gguf"),
        ("m.gguf", "--overwrite"),
        raw("m.gguf", b"an earlier export"),
    ),
    Case(
        "push-repo-id-without-owner",
        plain("push", "{ws}/tiny", "--repo-id", "tiny", "--dry-run"),
        ("--repo-id", "USER/NAME"),
    ),
    Case(
        "push-dir-without-weights",
        plain("push", "{ws}", "--repo-id", "me/tiny", "--dry-run"),
        ("holds no model weights", "sft, pref or merge"),
        text("notes.txt", "no weights here"),
    ),
    Case(
        "eval-unknown-task", plain("eval", "{ws}/tiny", "--tasks", "nope", "--offline"), ("nope",)
    ),
    Case(
        "eval-limit-zero", plain("eval", "{ws}/tiny", "--limit", "0", "--offline"), ("eval.limit",)
    ),
    Case(
        "eval-batch-size-text",
        plain("eval", "{ws}/tiny", "--batch-size", "big", "--offline"),
        ("eval.batch_size",),
    ),
    Case(
        "eval-fewshot-text",
        plain("eval", "{ws}/tiny", "--num-fewshot", "gsm8k=x", "--offline"),
        ("eval.num_fewshot",),
    ),
    Case("eval-no-model", plain("eval", "--offline"), ("MODEL",)),
    Case(
        "eval-compare-and-models", plain("eval", "{ws}/tiny", "--compare", "{ws}"), ("--compare",)
    ),
    Case(
        "eval-compare-nothing",
        plain("eval", "--compare", "{ws}/noresults"),
        ("noresults", "No eval results"),
    ),
    Case(
        "eval-winogrande-offline",
        plain("eval", "{ws}/tiny", "--tasks", "winogrande", "--offline"),
        ("winogrande",),
    ),
    Case("card-not-a-run", plain("card", "{ws}/tiny"), ("tiny", "config.yaml")),
    Case(
        "card-missing-results",
        plain("card", "{ws}/run", "--eval", "{ws}/noeval"),
        ("noeval",),
        lambda ws: fake_run(ws),
    ),
    Case(
        "card-foreign-readme",
        plain("card", "{ws}/run"),
        ("README.md", "--overwrite"),
        lambda ws: fake_run(ws) or (ws / "run" / "README.md").write_text("my notes"),
    ),
    Case("run-missing-recipe", plain("run", "{ws}/none.yaml"), ("none.yaml", "does not exist")),
    Case(
        "run-no-stages",
        plain("run", "{ws}/w.yaml"),
        ("w.yaml", "stages"),
        text("w.yaml", "train: {epochs: 1}\n"),
    ),
    Case(
        "run-unknown-stage",
        plain("run", "{ws}/w.yaml"),
        ("w.yaml", "stages[0]", "distill"),
        text("w.yaml", "stages:\n  - stage: distill\n"),
    ),
    Case(
        "run-stage-not-mapping",
        plain("run", "{ws}/w.yaml"),
        ("stages[0]",),
        text("w.yaml", "stages: [sft]\n"),
    ),
    Case(
        "run-duplicate-ids",
        plain("run", "{ws}/w.yaml"),
        ("'a'", "twice"),
        text("w.yaml", "stages:\n  - {stage: sft, id: a}\n  - {stage: sft, id: a}\n"),
    ),
    Case(
        "run-unknown-input",
        plain("run", "{ws}/w.yaml"),
        ("'sft'", "'ghost'"),
        text("w.yaml", "stages:\n  - {stage: sft, input: ghost}\n"),
    ),
    Case(
        "run-merge-full-weights",
        plain("run", "{ws}/w.yaml"),
        ("merge", "LoRA adapter"),
        text("w.yaml", "stages:\n  - stage: sft\n  - stage: merge\n"),
    ),
    Case(
        "run-pref-on-adapter",
        plain("run", "{ws}/w.yaml"),
        ("pref", "merge"),
        text("w.yaml", "model: {adapter: lora}\nstages:\n  - stage: sft\n  - stage: pref\n"),
    ),
    Case(
        "run-stage-sets-model",
        plain("run", "{ws}/w.yaml"),
        ("stages[0]", "model.name_or_path"),
        text("w.yaml", "stages:\n  - {stage: sft, model: {name_or_path: x}}\n"),
    ),
    Case(
        "run-stage-unknown-key",
        plain("run", "{ws}/w.yaml"),
        ("'train.epochz' in '", "w.yaml', stage 'sft'"),
        text("w.yaml", "stages:\n  - {stage: sft, train: {epochz: 1}}\n"),
    ),
    Case(
        "run-misspelt-stage-key",
        plain("run", "{ws}/w.yaml"),
        ("stages[0]", "'inptu'", "Did you mean 'input'?"),
        text("w.yaml", "stages:\n  - {stage: sft, inptu: base}\n"),
    ),
    Case(
        "run-misspelt-shared-section",
        plain("run", "{ws}/w.yaml"),
        ("'trian' in '", "w.yaml'", "train"),
        text("w.yaml", "trian: {epochs: 1}\nstages:\n  - stage: sft\n"),
    ),
    Case(
        "run-kind-key-misplaced",
        plain("run", "{ws}/w.yaml"),
        ("stages[0]", "dtype"),
        text("w.yaml", "stages:\n  - {stage: sft, dtype: float32}\n"),
    ),
    Case(
        "run-card-first",
        plain("run", "{ws}/w.yaml"),
        ("card", "training stage"),
        text("w.yaml", "stages:\n  - stage: card\n"),
    ),
    Case(
        "run-eval-unknown-model",
        plain("run", "{ws}/w.yaml"),
        ("eval", "ghost"),
        text("w.yaml", "stages:\n  - {stage: eval, models: [base, ghost]}\n"),
    ),
    Case(
        "run-from-unknown-stage",
        plain("run", "{ws}/w.yaml", "--from", "pref"),
        ("pref", "sft"),
        text("w.yaml", "stages:\n  - stage: sft\n"),
    ),
    Case(
        "run-bad-override",
        plain("run", "{ws}/w.yaml", "train.epochz=2"),
        ("train.epochz",),
        text("w.yaml", "stages:\n  - stage: sft\n"),
    ),
    Case(
        "eval-output-holds-the-model",
        evaluate(
            "--output-dir",
            "{ws}",
        ),
        ("holds", "tiny"),
    ),
    Case(
        "eval-results-dir-not-alignkits",
        evaluate(
            "--output-dir",
            "{ws}/evals",
        ),
        ("evals/tiny", "alignkit eval did not write"),
        lambda ws: (
            (ws / "evals" / "tiny").mkdir(parents=True) or (ws / "evals/tiny/notes").write_text("x")
        ),
    ),
    Case(
        "eval-output-is-a-file",
        evaluate(
            "--output-dir",
            "{ws}/good.jsonl",
        ),
        ("good.jsonl", "is a file"),
    ),
    Case(
        "learning-rate-nan", sft("--train.learning_rate", "nan"), ("train.learning_rate", "finite")
    ),
    Case("beta-inf", pref("--beta", "inf"), ("pref.beta", "finite")),
    Case(
        "chat-temperature-inf",
        plain("chat", "{ws}/tiny", "--prompt", "hi", "--temperature", "inf"),
        ("generation.temperature", "finite"),
    ),
    Case("train-seed-too-big", sft("--train.seed", str(2**64)), ("train.seed",)),
    Case(
        "chat-seed-too-big",
        plain("chat", "{ws}/tiny", "--prompt", "hi", "--seed", str(2**64)),
        ("generation.seed",),
    ),
    Case(
        "micro-batch-above-rows",
        sft("--train.micro_batch_size", "100"),
        ("Only 4 training rows", "micro_batch_size"),
    ),
    Case(
        "deeply-nested-json",
        inspect("deep.jsonl"),
        ("deep.jsonl", "line 1", "nested too deeply"),
        text("deep.jsonl", "[" * 100000 + "\n"),
    ),
    Case(
        "row-is-null",
        inspect("null.jsonl"),
        ("null.jsonl", "line 1", "JSON null"),
        text("null.jsonl", "null\n"),
    ),
    Case(
        "config-binary",
        sft("--config", "{ws}/bin.yaml"),
        ("bin.yaml", "UTF-8"),
        raw("bin.yaml", bytes(range(256))),
    ),
    Case(
        "api-key-file-binary",
        plain("serve", "{ws}/tiny", "--api-key-file", "{ws}/key.bin"),
        ("key.bin", "UTF-8"),
        raw("key.bin", b"\xff\xfe\x00"),
    ),
    Case(
        "api-key-file-missing",
        plain("serve", "{ws}/tiny", "--api-key-file", "{ws}/nokey"),
        ("nokey", "does not exist"),
    ),
    Case(
        "serve-port-taken",
        lambda ws: ["serve", str(ws / "tiny"), "--port", str(TAKEN.getsockname()[1])],
        ("Cannot listen", "--port"),
    ),
    Case(
        "adapter-base-is-itself",
        sft("--model", "{ws}/loop"),
        ("adapter_config.json", "back to itself"),
        lambda ws: adapter_dir(
            ws, "loop", json.dumps({"base_model_name_or_path": str(ws / "loop")})
        ),
    ),
    Case(
        "output-dir-dangling-link",
        sft("--output-dir", "{ws}/link"),
        ("link", "symbolic link to nothing"),
        lambda ws: (ws / "link").symlink_to(ws / "gone"),
    ),
    Case(
        "output-dir-under-a-file",
        sft("--output-dir", "{ws}/good.jsonl/sub"),
        ("good.jsonl", "which is a file"),
    ),
    Case(
        "card-run-info-incomplete",
        plain("card", "{ws}/run"),
        ("run_info.json", "lacks"),
        lambda ws: fake_run(ws) or (ws / "run" / "run_info.json").write_text('{"stage": "sft"}'),
    ),
    Case(
        "card-run-info-truncated",
        plain("card", "{ws}/run"),
        ("run_info.json", "damaged"),
        lambda ws: fake_run(ws) or (ws / "run" / "run_info.json").write_text('{"stage": '),
    ),
    Case(
        "card-out-is-a-directory",
        plain("card", "{ws}/run", "--out", "{ws}"),
        ("--out", "is a directory"),
        lambda ws: fake_run(ws),
    ),
]
CASES = DATA_CASES + OPTION_CASES


def truncated_model(ws: Path) -> None:
    import shutil

    shutil.copytree(ws / "tiny", ws / "cut")
    weights = ws / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])


def adapter_dir(ws: Path, name: str, config: str) -> None:
    (ws / name).mkdir()
    (ws / name / "adapter_config.json").write_text(config)


def fake_run(ws: Path) -> None:
    run = ws / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: {epochs: 1}\n")
    (run / "run_info.json").write_text(
        json.dumps(
            {
                "stage": "sft",
                "train_rows": 1,
                "eval_rows": 0,
                "data_kind": "sft",
                "steps": 1,
                "epochs_started": 1,
                "trained_tokens": 3,
                "train_seconds": 1.0,
                "processes": 1,
                "device": "cpu",
                "hardware": "x",
                "cpu_count": 2,
            }
        )
    )
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')


@pytest.fixture(scope="module")
def template(tmp_path_factory, smol_tokenizer) -> Path:
    """A workspace every case copies: a tiny model, an adapter, good SFT and pair data."""
    ws = tmp_path_factory.mktemp("workspace")
    make_tiny_llama(smol_tokenizer, ws / "tiny")
    write_jsonl(ws / "good.jsonl", [ALPACA] * 4)
    write_jsonl(ws / "pairs.jsonl", [PAIR, {**PAIR, "chosen": "Hello."}] * 2)
    from alignkit.config import LoraConfig, ModelConfig
    from alignkit.models import load_model

    tiny = ModelConfig(name_or_path=str(ws / "tiny"), adapter="lora")
    model = load_model(tiny, LoraConfig(r=2), trainable=True)
    model.save_pretrained(ws / "adapter")
    return ws


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def test_the_suite_covers_at_least_a_hundred_cases():
    assert len(CASES) >= 100
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_a_named_error_and_changes_nothing(case, template, tmp_path, capsys):
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws)
    try:
        code = main(case.argv(ws))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for expected in case.expect:
        assert expected.replace("{ws}", str(ws)) in err, f"{expected!r} not in: {err}"
    assert snapshot(ws) == before


@pytest.mark.parametrize("command", ["inspect", "sft"])
def test_a_file_this_user_cannot_read_is_a_named_error(
    command, template, tmp_path, capsys, monkeypatch
):
    """Permissions cannot be taken from root (which runs some CI), so the denial comes
    from `open` for the one data file; everything else opens as usual."""
    import builtins
    import errno
    import io
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    data = ws / "good.jsonl"
    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if str(file) == str(data):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    monkeypatch.setattr(io, "open", denied)  # what pathlib opens with
    argv = inspect("good.jsonl")(ws) if command == "inspect" else sft()(ws)
    before = snapshot(ws)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and str(data) in err and "permission" in err.lower()
    assert snapshot(ws) == before

"""`alignkit eval`: shipped benchmark data in the hub schema, lm-eval prompts unchanged,
context-shared scoring equal to lm-eval's, limits, outputs, offline end to end."""

from __future__ import annotations

import bz2
import csv
import json
import re
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.config import load_recipe
from alignkit.errors import AlignkitError
from alignkit.eval.convert import hellaswag_rows, split_hellaswag_context
from alignkit.eval.offline_nltk import use_shipped_punkt
from alignkit.eval.run import summarize
from alignkit.eval.tasks import (
    BENCHMARKS,
    OFFLINE_TASKS,
    check_offline,
    eval_split_sizes,
    parse_fewshot,
    parse_tasks,
    spread_limit,
    write_offline_tasks,
)
from alignkit.rundir import load_results

SOURCE = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"
needs_source = pytest.mark.skipif(not SOURCE.is_dir(), reason="../shared/data not present")


def jsonl(name: str, n: int) -> list[dict]:
    with open(SOURCE / name, encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


@pytest.fixture(scope="module")
def offline_tasks(tmp_path_factory):
    """lm-eval Task objects for every offline benchmark, built on the shipped data."""
    use_shipped_punkt()
    from lm_eval.tasks import TaskManager, get_task_dict

    benchmarks = [BENCHMARKS[n] for n in OFFLINE_TASKS]
    folder = write_offline_tasks(benchmarks, tmp_path_factory.mktemp("tasks"))
    names = [n for n in OFFLINE_TASKS if n != "mmlu"] + ["mmlu_abstract_algebra"]
    return get_task_dict(names, TaskManager(include_path=str(folder)))


def rendered(task, index: int) -> tuple[str, object, list[str] | None]:
    doc = list(task.eval_docs)[index]
    choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None
    return task.doc_to_text(doc), task.doc_to_target(doc), choices


# ---------------------------------------------------------------- shipped data == hub schema


@needs_source
def test_gsm8k_prompt_and_target(offline_tasks):
    for i, record in enumerate(jsonl("gsm8k_test.jsonl", 3)):
        text, target, _ = rendered(offline_tasks["gsm8k"], i)
        assert text == f"Question: {record['question']}\nAnswer:"
        assert target == record["answer"]


@needs_source
@pytest.mark.parametrize("task", ["arc_challenge", "arc_easy"])
def test_arc_prompt_choices_and_gold(offline_tasks, task):
    for i, record in enumerate(jsonl(f"{task}_test.jsonl", 3)):
        question = record["question"]
        if isinstance(question, dict):  # ARC-Easy's copy keeps the original nested schema
            labels = [c["label"] for c in question["choices"]]
            texts = [c["text"] for c in question["choices"]]
            question = question["stem"]
        else:
            labels, texts = record["choices"]["label"], record["choices"]["text"]
        text, target, choices = rendered(offline_tasks[task], i)
        assert text == f"Question: {question}\nAnswer:"
        assert choices == texts
        assert target == labels.index(record["answerKey"])


@needs_source
def test_mmlu_prompt_letters_and_answer(offline_tasks):
    with open(SOURCE / "mmlu/test/abstract_algebra_test.csv", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))[:3]
    task = offline_tasks["mmlu_abstract_algebra"]
    for i, r in enumerate(records):
        text, target, choices = rendered(task, i)
        assert text == (
            f"{r['question'].strip()}\nA. {r['choice0']}\nB. {r['choice1']}\n"
            f"C. {r['choice2']}\nD. {r['choice3']}\nAnswer:"
        )
        assert choices == ["A", "B", "C", "D"] and target == int(r["answer"])
    assert task.config.description.startswith("The following are multiple choice questions")
    assert len(list(task.fewshot_docs())) == 5  # the dev split is the 5-shot pool


@needs_source
def test_hellaswag_query_rebuilds_the_hub_preprocessing(offline_tasks):
    text, target, choices = rendered(offline_tasks["hellaswag"], 0)
    # upstream item 0: "Roof shingle removal: A man is sitting on a roof. he", gold 3
    assert text == "Roof shingle removal: A man is sitting on a roof. He"
    assert target == 3
    assert choices[3] == "starts pulling up roofing on a roof."
    with bz2.open(SOURCE / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as handle:
        lines = [next(handle).rstrip("\n") for _ in range(12)]
    second = list(hellaswag_rows(lines))[1]
    assert (second["ctx_a"], second["ctx_b"]) == (
        "A lady walks to a barbell. She bends down and grabs the pole.",
        "the lady",
    )
    assert split_hellaswag_context("Intro. Title Case start") == ("Intro. Title Case start", "")


@needs_source
def test_truthfulqa_mc2_is_correct_then_incorrect(offline_tasks):
    with open(SOURCE / "truthfulqa.csv", encoding="utf-8-sig") as handle:
        record = next(csv.DictReader(handle))
    task = offline_tasks["truthfulqa_mc2"]
    doc = list(task.eval_docs)[0]
    text, _, choices = rendered(task, 0)
    assert text.endswith(f"\n\nQ: {record['Question']}\nA:")
    correct = [a.strip() for a in record["Correct Answers"].split(";")]
    incorrect = [a.strip() for a in record["Incorrect Answers"].split(";")]
    assert choices[0] == record["Best Answer"]
    assert set(choices[: len(correct)]) == set(correct)
    assert choices[len(correct) :] == incorrect
    assert doc["mc2_targets"]["labels"] == [1] * len(correct) + [0] * len(incorrect)


@needs_source
def test_ifeval_rows_carry_every_kwarg(offline_tasks):
    record = jsonl("ifeval_input_data.jsonl", 1)[0]
    doc = list(offline_tasks["ifeval"].eval_docs)[0]
    assert offline_tasks["ifeval"].doc_to_text(doc) == record["prompt"]
    assert doc["instruction_id_list"] == record["instruction_id_list"]
    assert {k: v for k, v in doc["kwargs"][1].items() if v is not None} == record["kwargs"][1]
    assert len(doc["kwargs"][0]) > 20 and all(v is None for v in doc["kwargs"][0].values())


def test_offline_few_shot_never_shows_the_item_itself(offline_tasks):
    task = offline_tasks["arc_challenge"]
    doc = list(task.eval_docs)[0]
    context = task.fewshot_context(doc, num_fewshot=25)
    assert context.count(doc["question"]) == 1 and context.count("Question:") == 26


# ---------------------------------------------------------------- scoring on fixed responses


def test_gsm8k_flexible_extract_scores_known_answers(offline_tasks):
    from lm_eval.filters.extraction import RegexFilter

    task = offline_tasks["gsm8k"]
    flexible = next(f for f in task.config.filter_list if f["name"] == "flexible-extract")
    regex = RegexFilter(**{k: v for k, v in flexible["filter"][0].items() if k != "function"})
    doc = {"question": "q", "answer": "2 + 2 = 4\n#### 1,234"}
    responses = ["So the total is $1,234.", "First 12, then 1234", "It is 1233 or 12."]
    extracted = [r[0] for r in regex.apply([[r] for r in responses], [doc] * 3)]
    assert extracted == ["$1,234.", "1234", "12."]
    scores = [task.process_results(doc, [e])["exact_match"] for e in extracted]
    assert scores == [1.0, 1.0, 0.0]


def test_ifeval_scores_known_responses(offline_tasks):
    from lm_eval.tasks.ifeval import utils

    doc = list(offline_tasks["ifeval"].eval_docs)[0]  # no commas, 3 highlights, 300+ words
    assert doc["instruction_id_list"] == [
        "punctuation:no_comma",
        "detectable_format:number_highlighted_sections",
        "length_constraints:number_words",
    ]
    followed = "*one* *two* *three* " + "word " * 300
    violated = "Short, with a comma and *one* highlight."
    good, bad = utils.process_results(doc, [followed]), utils.process_results(doc, [violated])
    assert good["prompt_level_strict_acc"] and good["inst_level_strict_acc"] == [True] * 3
    assert not bad["prompt_level_strict_acc"] and bad["inst_level_strict_acc"] == [False] * 3


# ---------------------------------------------------------------- plan: tasks, shots, limits


def test_seed_defaults_and_overrides():
    benchmarks = parse_tasks(["gsm8k,mmlu", "arc_challenge", "hellaswag,ifeval"])
    assert parse_fewshot(None, benchmarks) == {
        "gsm8k": 5,
        "mmlu": 5,
        "arc_challenge": 25,
        "hellaswag": 10,
        "ifeval": 0,
    }
    assert parse_fewshot("gsm8k=8,mmlu=0", benchmarks)["gsm8k"] == 8
    assert set(parse_fewshot("3", benchmarks).values()) == {3}
    with pytest.raises(AlignkitError, match="task=N"):
        parse_fewshot("winogrande=5", benchmarks)
    with pytest.raises(AlignkitError, match="Known: ifeval"):
        parse_tasks(["gsm8k,gsm9k"])


def test_winogrande_offline_is_a_clear_error():
    with pytest.raises(AlignkitError, match="No offline copy of winogrande"):
        check_offline(parse_tasks(["gsm8k,winogrande"]))


def test_mmlu_limit_is_spread_over_subjects():
    sizes = eval_split_sizes(BENCHMARKS["mmlu"])
    assert len(sizes) == 57 and sum(sizes.values()) == 14042
    for limit in (1, 20, 100, 1000):
        counts = spread_limit(limit, sizes)
        assert sum(counts.values()) == limit
        assert all(counts[t] <= sizes[t] for t in sizes)
        shares = [counts[t] - limit * sizes[t] / 14042 for t in sizes]
        assert max(abs(s) for s in shares) < 1  # proportional to subject size
    assert spread_limit(10**6, sizes) == sizes
    assert spread_limit(5, {"gsm8k": 1319}) == {"gsm8k": 5}


# ---------------------------------------------------------------- context-shared scoring


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def offline_run(tiny_model_dir, tmp_path_factory):
    """Every offline task, --limit 2, with a tiny random model and no network."""
    out = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr("alignkit.eval.tasks.hub_reachable", lambda: pytest.fail("hub contacted"))
        code = main(
            [
                "eval",
                str(tiny_model_dir),
                str(tiny_model_dir),
                "--offline",
                "--tasks",
                ",".join(OFFLINE_TASKS),
                "--limit",
                "2",
                "--max-gen-toks",
                "16",
                "--output-dir",
                str(out),
            ]
        )
    assert code == 0
    return out


def test_offline_run_writes_results_table_and_chart(offline_run, tiny_model_dir):
    results = load_results([offline_run])
    assert [r["model"] for r in results] == [f"{tiny_model_dir.name}-1", f"{tiny_model_dir.name}-2"]
    summary = results[0]["summary"]
    assert {k.split("/")[0] for k in summary} == set(OFFLINE_TASKS)
    assert all(0.0 <= v["value"] <= 1.0 for v in summary.values())
    assert summary["mmlu"]["items"] == 2 and summary["gsm8k"]["items"] == 2
    assert summary["truthfulqa_mc2"]["note"].startswith("MC2 targets derived")
    assert results[0]["settings"]["arc_challenge"]["num_fewshot"] == 25
    assert results[0]["settings"]["ifeval"]["apply_chat_template"] is True
    assert set(results[0]["task_seconds"]) == set(OFFLINE_TASKS)
    assert results[0]["dtype"] == "float32"  # the weights scored, as loaded
    assert (
        results[0]["lm_eval"]["gsm8k"]["results"]["gsm8k"]["exact_match,flexible-extract"]
        == summary["gsm8k"]["value"]
    )
    table = (offline_run / "comparison.md").read_text()
    assert "| GSM8K (5-shot, flexible-extract) |" in table
    mark = re.search(r"\| TruthfulQA MC2 \(0-shot\) (\S+) \|", table).group(1)
    assert f"{mark} Offline data: MC2 targets derived" in table
    assert "at most 2 items per benchmark" in table and "capped at 16 tokens" in table
    assert (offline_run / "comparison.png").stat().st_size > 10_000
    samples = offline_run / f"{tiny_model_dir.name}-1" / "samples" / "ifeval.jsonl"
    prompts = [json.loads(line)["arguments"] for line in samples.read_text().splitlines()]
    assert len(prompts) == 2 and "<|im_start|>user" in json.dumps(prompts[0])


def test_existing_results_are_not_overwritten(offline_run, tiny_model_dir):
    before = (offline_run / f"{tiny_model_dir.name}-1" / "results.json").read_text()
    with pytest.raises(AlignkitError, match="already exists"):
        main_raising(
            [
                "eval",
                str(tiny_model_dir),
                str(tiny_model_dir),
                "--offline",
                "--tasks",
                "gsm8k",
                "--limit",
                "1",
                "--output-dir",
                str(offline_run),
            ]
        )
    assert (offline_run / f"{tiny_model_dir.name}-1" / "results.json").read_text() == before


def test_compare_rerenders_without_running(offline_run, tmp_path, capsys):
    runs = sorted(p for p in offline_run.iterdir() if p.is_dir())
    assert (
        main(["eval", "--compare", str(runs[1]), str(runs[0]), "--output-dir", str(tmp_path)]) == 0
    )
    table = (tmp_path / "comparison.md").read_text()
    assert table.index(runs[1].name) < table.index(runs[0].name)
    assert (
        tmp_path / "comparison.png"
    ).is_file() and "| MMLU (5-shot) |" in capsys.readouterr().out
    with pytest.raises(AlignkitError, match="No eval results"):
        load_results([tmp_path / "nothing"])


def test_every_figure_gets_a_standard_error_and_its_share_of_the_benchmark():
    """lm-eval gives none for a subject of one item or for IFEval's instruction level:
    those come from the logged item scores, sample stdev / sqrt(n), as lm-eval's own."""
    mmlu = {
        "results": {
            f"mmlu_{s}": {"acc,none": score, "acc_stderr,none": "N/A"}
            for s, score in (("anatomy", 1.0), ("astronomy", 0.0))
        },
        "n-samples": {"mmlu_anatomy": {"effective": 1}, "mmlu_astronomy": {"effective": 1}},
        "samples": {
            "mmlu_anatomy": [{"filter": "none", "acc": 1.0}],
            "mmlu_astronomy": [{"filter": "none", "acc": 0.0}],
        },
    }
    figure = summarize(BENCHMARKS["mmlu"], mmlu, offline=True, shots=5, total=14042)["mmlu"]
    # scores [1, 0]: mean 0.5, sample stdev sqrt(0.5), stderr sqrt(0.5) / sqrt(2) = 0.5
    assert figure["value"] == 0.5 and figure["stderr"] == pytest.approx(0.5)
    assert (figure["items"], figure["total_items"]) == (2, 14042)
    ifeval = {
        "results": {
            "ifeval": {
                **{f"{m},none": 0.5 for m in ("prompt_level_strict_acc", "prompt_level_loose_acc")},
                **{
                    f"{m}_stderr,none": 0.5
                    for m in ("prompt_level_strict_acc", "prompt_level_loose_acc")
                },
                "inst_level_strict_acc,none": 0.75,
                "inst_level_strict_acc_stderr,none": "N/A",
                "inst_level_loose_acc,none": 0.75,
                "inst_level_loose_acc_stderr,none": "N/A",
            }
        },
        "n-samples": {"ifeval": {"effective": 2}},
        "samples": {
            "ifeval": [
                {"filter": "none", "inst_level_strict_acc": [True, True, True]},
                {"filter": "none", "inst_level_strict_acc": [False]},
            ]
        },
    }
    figures = summarize(BENCHMARKS["ifeval"], ifeval, offline=True, shots=0, total=541)
    assert figures["ifeval/prompt_level_strict_acc"]["stderr"] == 0.5  # lm-eval's own
    # instructions [1, 1, 1, 0]: mean 0.75, sample stdev 0.5, stderr 0.5 / sqrt(4) = 0.25
    assert figures["ifeval/inst_level_strict_acc"]["stderr"] == pytest.approx(0.25)


def test_eval_settings_come_from_the_recipe(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("eval:\n  tasks: [gsm8k, hellaswag]\n  limit: 7\n  offline: true\n")
    recipe = load_recipe(str(recipe_file), [("eval.limit", "3")])
    assert recipe.eval.tasks == ["gsm8k", "hellaswag"] and recipe.eval.limit == 3


def main_raising(argv: list[str]) -> None:
    """Run the eval command and let its AlignkitError through (main() prints it)."""
    from alignkit.cli import build_parser

    args, extra = build_parser().parse_known_args(argv)
    args.handler(args, extra)


@pytest.mark.slow
def test_bundled_model_beats_chance_on_arc(tmp_path):
    main(
        [
            "eval",
            "default",
            "--offline",
            "--tasks",
            "arc_easy,arc_challenge",
            "--num-fewshot",
            "0",
            "--limit",
            "60",
            "--output-dir",
            str(tmp_path),
        ]
    )
    summary = load_results([tmp_path])[0]["summary"]
    assert summary["arc_easy"]["value"] > 0.4  # chance is 0.25; SmolLM2-135M scores ~0.6
    assert 0.15 < summary["arc_challenge"]["value"] < 0.6

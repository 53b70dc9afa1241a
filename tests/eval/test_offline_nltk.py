"""lm-eval's IFEval checkers score offline with alignkit's shipped Punkt parameters.

Each checker family gets one response that follows its instruction and one that does not.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignkit.eval.offline_nltk import SHIPPED, use_shipped_punkt

use_shipped_punkt()  # before lm-eval's IFEval module is imported anywhere in this process
registry = pytest.importorskip("lm_eval.tasks.ifeval.instructions_registry")

CASES = [  # (instruction id, kwargs, followed, violated)
    ("keywords:existence", {"keywords": ["banana"]}, "I like banana bread.", "I like bread."),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A dog barked.", "A cat sat."),
    (
        "language:response_language",
        {"language": "en"},
        "The weather is lovely today and we are going for a long walk in the park.",
        "Le temps est magnifique aujourd'hui et nous allons nous promener dans le parc.",
    ),
    # Mr. is a listed abbreviation: one sentence, not two
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "less than"},
        "Mr. Smith arrived at noon.",
        "He came. He saw. He left.",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "at least"},
        "one two three four five six",
        "one two",
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "First part.\n***\nSecond part.",
        "Only one part.",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        "Hello.\nP.S. See you soon.",
        "Hello.",
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 1},
        "Send it to [address].",
        "Send it to me.",
    ),
    ("detectable_format:json_format", {}, '{"answer": 42}', "The answer is 42."),
    ("detectable_format:title", {}, "<<A Poem>>\nRoses are red.", "Roses are red."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi"}, "Say hi. Hi!", "Hi!"),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Done. Any other questions?",
        "Done.",
    ),
    ("startend:quotation", {}, '"wrapped in quotes"', "not wrapped"),
    ("change_case:english_lowercase", {}, "all in lower case", "Not All Lower"),
    # counted on nltk.word_tokenize, which needs punkt_tab
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "HELLO there BIG world",
        "hello there",
    ),
    ("punctuation:no_comma", {}, "no commas here", "one, two"),
]


@pytest.mark.parametrize(
    ("instruction", "kwargs", "followed", "violated"), CASES, ids=[c[0] for c in CASES]
)
def test_checker_scores_known_responses(instruction, kwargs, followed, violated):
    checker = registry.INSTRUCTION_DICT[instruction](instruction)
    checker.build_description(**kwargs)
    assert checker.check_following(followed) is True
    assert checker.check_following(violated) is False


def test_every_checker_family_is_covered():
    families = {name.split(":")[0] for name in registry.INSTRUCTION_DICT}
    assert families == {c[0].split(":")[0] for c in CASES}


def test_import_attempts_no_download():
    code = (
        "import nltk\n"
        "def refuse(*a, **k): raise SystemExit('download attempted')\n"
        "nltk.download = refuse\n"
        "from alignkit.eval.offline_nltk import use_shipped_punkt\n"
        "use_shipped_punkt()\n"
        "from lm_eval.tasks.ifeval import instructions_util as u\n"
        "print(u.count_sentences('Dr. Who is here. So am I.'), nltk.data.find('tokenizers/punkt_tab'))\n"
    )
    env = {"NLTK_DATA": str(SHIPPED / "missing"), "PATH": "", "HOME": "/nonexistent"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    count, found = result.stdout.split()
    assert count == "2" and found.startswith(str(SHIPPED))

"""Offline sentence splitting for lm-eval's IFEval scorer.

lm-eval's IFEval module calls `nltk.download("punkt_tab")` at import unless NLTK finds
that resource, and its checkers split sentences with NLTK's Punkt tokenizer. alignkit
ships a `punkt_tab/english` parameter set of its own (`nltk_data/` next to this file):
Punkt's unsupervised rules plus a hand-written list of common English abbreviations,
with no learned collocations or sentence starters. NLTK's downloadable English model
also learned those from a corpus, so a rare sentence count can differ from it (for
example after an abbreviation missing from the list).
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).with_name("nltk_data")


def use_shipped_punkt() -> None:
    """Let NLTK find the shipped punkt_tab before lm-eval's IFEval module is imported.

    A punkt_tab the user installed elsewhere still wins: the shipped one is searched last.
    """
    import nltk

    if str(SHIPPED) not in nltk.data.path:
        nltk.data.path.append(str(SHIPPED))

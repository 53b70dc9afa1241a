"""Tokenized data prepared once: `datasets.Dataset.map` into memory-mapped Arrow files, cached.

The canonical examples (read and converted by `sources`, with its row-level errors and
skip counts) are tokenized by `tokenize.batch_outcomes` in a batched `map` with `num_proc`
workers. Its cache files are `$ALIGNKIT_CACHE/tokenized/<key>*.arrow` (`cache_path`),
where the key digests everything that changes the result: the examples, the tokenizer,
the chat template, the data settings, and the tokenization code with the versions of
the libraries it renders and encodes with (`tokenization_key`). A later run with the same
key, or another process of the same run, memory-maps those files instead of tokenizing.

A dropped example stays in the files as a row with its reason, so the report (kept,
split, truncated, dropped counts) is counted from the files exactly as from a fresh run;
`TokenizedRows` serves the kept rows by index as the items `tokenize` makes.

`prepare_sources` goes one step further for local files: a manifest keyed by the files'
bytes (`manifest_path`) names the Arrow files and what reading the sources did, so a
later run, or another process of the same run, reads neither the files nor their rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from alignkit import chat_templates, models
from alignkit.chat_templates import ChatTemplate
from alignkit.config import DataConfig, DataSource
from alignkit.data import formats, sources, tokenize
from alignkit.data.formats import Conversation, Example, Feedback, PreferencePair
from alignkit.data.sources import SourceReport, load_mixture
from alignkit.data.tokenize import (
    Outcome,
    TokenizedExample,
    TokenizedFeedback,
    TokenizedPair,
    TokenizeReport,
    batch_outcomes,
    check_prompt_limit,
    tally,
)
from alignkit.errors import AlignkitError
from alignkit.rundir.write import atomic_file

CACHE_SUBDIR = "tokenized"
MAX_DEFAULT_PROCS = 16
ROWS_PER_PROC = 500  # fewer rows than this per worker are tokenized in-process
BATCH_SIZE = 256  # examples per map call
READ_BATCH = 1024  # rows read at once when iterating

EXAMPLE_TYPES: dict[str, type] = {
    "sft": Conversation,
    "pair": PreferencePair,
    "feedback": Feedback,
}
ITEM_TYPES: dict[str, type] = {
    "sft": TokenizedExample,
    "pair": TokenizedPair,
    "feedback": TokenizedFeedback,
}
# the item fields stored per kind; the rest (reference log-probs, KL completions) are set
# after tokenization, so are None here
STORED = {
    "sft": ("input_ids", "labels_mask"),
    "pair": ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_mask", "rejected_mask"),
    "feedback": ("prompt_ids", "completion_ids", "label", "completion_mask"),
}
OUTCOME_FIELDS = ("first", "examples", "dropped", "truncated", "retokenized")
# what the key covers besides the data: this code and what reads, renders and encodes text
CODE_MODULES = (tokenize, chat_templates, formats, sources)
LIBRARIES = ("alignkit", "transformers", "tokenizers", "jinja2", "datasets")


def cache_path(key: str) -> Path:
    """The cache file of one tokenization (with `_<rank>_of_<n>` before `.arrow` for each
    worker's shard when it ran in several)."""
    return models.cache_dir() / CACHE_SUBDIR / f"{key}.arrow"


def manifest_path(key: str) -> Path:
    """What `prepare_sources` made from one set of source files: the Arrow files, the
    examples' kind and count, and each source's report."""
    return models.cache_dir() / CACHE_SUBDIR / f"{key}.sources.json"


def default_num_proc() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_DEFAULT_PROCS))


def kind_of(example: Example) -> str:
    return next(kind for kind, cls in EXAMPLE_TYPES.items() if isinstance(example, cls))


def example_json(example: Example) -> str:
    """The example's fields as JSON (its messages are plain dicts and lists, so this is
    `dataclasses.asdict`'s JSON without its deep copy)."""
    fields = {f.name: getattr(example, f.name) for f in dataclasses.fields(example)}
    return json.dumps(fields, ensure_ascii=False)


def example_from_json(kind: str, text: str) -> Example:
    return EXAMPLE_TYPES[kind](**json.loads(text))


def tokenizer_digest(tokenizer: Any) -> str:
    """The tokenizer's vocabulary, rules and special tokens (a fast tokenizer's whole
    serialized state; anything else as `datasets` hashes it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        from datasets.fingerprint import Hasher

        return Hasher.hash(tokenizer)
    parts = [
        type(tokenizer).__name__,
        backend.to_str(),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        str(getattr(tokenizer, "split_special_tokens", None)),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def code_digest() -> str:
    """The tokenization code's source and the versions of the libraries it calls."""
    digest = hashlib.sha256()
    for module in CODE_MODULES:
        digest.update(Path(module.__file__).read_bytes())
    for name in LIBRARIES:
        digest.update(f"{name} {metadata.version(name)}".encode())
    return digest.hexdigest()


def tokenization_key(
    examples_digest: str, tokenizer: Any, template: ChatTemplate, cfg: DataConfig
) -> str:
    """The cache key: the examples, tokenizer, template, data settings and code."""
    settings = dataclasses.asdict(cfg)
    settings.pop("num_proc")  # how many workers tokenize never changes the result
    parts = {
        "examples": examples_digest,
        "tokenizer": tokenizer_digest(tokenizer),
        "template": dataclasses.asdict(template),
        "data": settings,
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def features(kind: str) -> Any:
    from datasets import Features, List, Value

    ids, mask = List(Value("int32")), List(Value("bool"))
    item = {
        name: Value("bool") if name == "label" else mask if name.endswith("mask") else ids
        for name in STORED[kind]
    }
    outcome = {
        "first": Value("bool"),
        "examples": Value("int32"),
        "dropped": Value("string"),
        "truncated": Value("bool"),
        "retokenized": Value("bool"),
    }
    return Features({**outcome, **item})


def outcome_columns(
    texts: list[str], *, kind: str, tokenizer: Any, template: ChatTemplate, cfg: DataConfig
) -> dict[str, list[Any]]:
    """The map function: a batch of serialized examples -> one row per example made."""
    examples = [example_from_json(kind, text) for text in texts]
    outcomes = batch_outcomes(examples, tokenizer, template, cfg)
    columns = {name: [getattr(o, name) for o in outcomes] for name in OUTCOME_FIELDS}
    for name in STORED[kind]:
        columns[name] = [None if o.item is None else getattr(o.item, name) for o in outcomes]
    return columns


def report_of(table: Any, rows: int) -> TokenizeReport:
    """The report counted from the stored outcomes."""
    columns = [table.column(name).to_pylist() for name in OUTCOME_FIELDS]
    outcomes = (
        Outcome(**dict(zip(OUTCOME_FIELDS, values, strict=True)))
        for values in zip(*columns, strict=True)
    )
    return tally(TokenizeReport(rows=rows), outcomes)


class TokenizedRows(Sequence):
    """The kept tokenized items, read from memory-mapped Arrow by index (a slice gives a list)."""

    def __init__(self, dataset: Any, kind: str, index: np.ndarray):
        self.dataset, self.kind, self.index = dataset, kind, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return self._items(self.index[i])
        return self._items(self.index[[i]])[0]

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self), READ_BATCH):
            yield from self._items(self.index[start : start + READ_BATCH])

    def _items(self, rows: np.ndarray) -> list[Any]:
        """The items of these dataset rows, read in one batch."""
        if not len(rows):
            return []
        names = STORED[self.kind]
        columns = self.dataset[rows.tolist()]
        make = ITEM_TYPES[self.kind]
        return [
            make(**dict(zip(names, values, strict=True)))
            for values in zip(*(columns[n] for n in names), strict=True)
        ]

    def subset(self, positions: Sequence[int]) -> TokenizedRows:
        """The rows at these positions, in this order (no copy of the data)."""
        return TokenizedRows(self.dataset, self.kind, self.index[np.asarray(positions, dtype=int)])


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars (alignkit reports what tokenization did in one line)."""
    from datasets.utils import logging as ds_logging

    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            ds_logging.enable_progress_bar()


def prepare_examples(
    examples: list[Example],
    tokenizer: Any,
    template: ChatTemplate,
    cfg: DataConfig,
    key: str | None = None,
) -> tuple[TokenizedRows, TokenizeReport]:
    """Tokenized rows and the report, from the cache when this tokenization ran before.

    `key` names the cache files when the caller has keyed the examples already (by their
    source files: `sources_key`), else they are keyed by their contents.
    Tokenizes in `cfg.num_proc` worker processes (default: `default_num_proc`); under
    several training processes call it on the main one first (the others then read its
    files).
    """
    from datasets import Dataset

    check_prompt_limit(cfg)
    if not examples:
        empty = Dataset.from_dict({name: [] for name in features("sft")}, features("sft"))
        return TokenizedRows(empty, "sft", np.arange(0)), TokenizeReport()
    kind = kind_of(examples[0])
    texts = [example_json(e) for e in examples]
    key = key or tokenization_key(
        hashlib.sha256("\n".join(texts).encode()).hexdigest(), tokenizer, template, cfg
    )
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    procs = min(cfg.num_proc or default_num_proc(), len(texts) // ROWS_PER_PROC)
    source = Dataset.from_dict({"example": texts})
    del texts
    with quiet_datasets():
        tokenized = source.map(
            outcome_columns,
            input_columns="example",
            batched=True,
            batch_size=BATCH_SIZE,
            num_proc=procs if procs > 1 else None,
            remove_columns=["example"],
            features=features(kind),
            fn_kwargs={"kind": kind, "tokenizer": tokenizer, "template": template, "cfg": cfg},
            cache_file_name=str(path),
            new_fingerprint=key,
            load_from_cache_file=True,
        )
    return kept_rows(tokenized, kind), report_of(tokenized.data, len(examples))


def kept_rows(dataset: Any, kind: str) -> TokenizedRows:
    """The rows of a tokenized dataset that hold an item (not a dropped example)."""
    kept = np.asarray(dataset.data.column("dropped").is_null())
    return TokenizedRows(dataset, kind, np.flatnonzero(kept))


@dataclass
class Prepared:
    """Tokenized rows from some sources, with what reading and tokenizing them did."""

    rows: TokenizedRows
    report: TokenizeReport
    sources: list[SourceReport]


def sources_key(
    data_sources: list[DataSource], tokenizer: Any, template: ChatTemplate, cfg: DataConfig
) -> str | None:
    """The key of a prepared mixture of local files, from the files' bytes and how they are
    read (None when a source is not a local file: a hub dataset is keyed by its examples
    once read)."""
    paths = [Path(s.path).expanduser() for s in data_sources]
    if not paths or not all(p.is_file() for p in paths):
        return None
    files = [
        {**dataclasses.asdict(source), "sha256": models.file_sha256(path)}
        for source, path in zip(data_sources, paths, strict=True)
    ]
    return tokenization_key(json.dumps(files, sort_keys=True), tokenizer, template, cfg)


def read_manifest(key: str) -> Prepared | None:
    """The prepared mixture a manifest names, or None when it is missing or any file it
    names is gone or unreadable (then the sources are prepared again)."""
    from datasets import Dataset, concatenate_datasets

    path = manifest_path(key)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        parts = [Dataset.from_file(name) for name in manifest["files"]]
        reports = [
            SourceReport(**{**r, "skipped": Counter(r["skipped"])}) for r in manifest["sources"]
        ]
        kind, examples = manifest["kind"], manifest["examples"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return Prepared(kept_rows(dataset, kind), report_of(dataset.data, examples), reports)


def write_manifest(key: str, prepared: Prepared) -> None:
    """Name the prepared mixture's Arrow files under `key`, in one rename."""
    files = [f["filename"] for f in prepared.rows.dataset.cache_files]
    if not files:  # no examples: nothing on disk to point at
        return
    manifest = {
        "files": files,
        "kind": prepared.rows.kind,
        "examples": prepared.report.rows,
        "sources": [source_fields(r) for r in prepared.sources],
    }
    path = manifest_path(key)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(manifest), encoding="utf-8")


def source_fields(report: SourceReport) -> dict[str, Any]:
    """A source report as JSON values (`dataclasses.asdict` would turn its Counter's items
    into counted keys)."""
    fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    return {**fields, "skipped": dict(report.skipped)}


def check_kind(reports: list[SourceReport], kinds: tuple[str, ...], option: str) -> None:
    kind = reports[0].kind
    if kind not in kinds:
        raise AlignkitError(
            f"This stage trains on {' or '.join(kinds)} data; {reports[0].path} holds {kind} "
            f"data. Check {option} (alignkit data inspect shows what a file holds)."
        )


def prepare_sources(
    data_sources: list[DataSource],
    kinds: tuple[str, ...],
    tokenizer: Any,
    template: ChatTemplate,
    cfg: DataConfig,
    option: str = "data.sources",
) -> Prepared:
    """Read, mix and tokenize the sources (of one of `kinds`), or load what an earlier run
    or process made from the same files; `option` names them in errors."""
    key = sources_key(data_sources, tokenizer, template, cfg)
    found = read_manifest(key) if key else None
    if found is not None:
        check_kind(found.sources, kinds, option)
        return found
    examples, reports = load_mixture(data_sources, cfg.strict, cfg.seed)
    check_kind(reports, kinds, option)
    rows, report = prepare_examples(examples, tokenizer, template, cfg, key)
    prepared = Prepared(rows, report, reports)
    if key:
        write_manifest(key, prepared)
    return prepared

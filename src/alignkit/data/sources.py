"""Reading records from local files or the hub, converting them, and mixing sources.

Errors name the file, the row (the line for JSON Lines) and the field, and say what
to do. Skipped rows are counted per reason and reported, never dropped silently.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.config import DataSource
from alignkit.data.formats import FORMATS, Example, Format, RowProblem, detect_format, formats_help
from alignkit.errors import AlignkitError

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
SLICE = re.compile(r"^(?P<split>[\w.-]*)(\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\])?$")


@dataclass
class SourceReport:
    """What happened to one source's rows."""

    path: str
    format: str
    kind: str
    rows: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as handle:
            return handle.read()
    return path.read_bytes()


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 text (a BOM is dropped); anything else is an error naming the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        utf16 = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise AlignkitError(
            f"{path}: line {line}, column {column}: byte {data[exc.start]:#04x} is not UTF-8 "
            f"text{utf16}. Save the file as UTF-8."
        ) from None


def _read_text(path: Path) -> str:
    return _decode(_read_bytes(path), path)


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    # only \n ends a record: U+2028 and friends are legal inside JSON strings
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise AlignkitError(
                f"{path}: line {number} is not valid JSON ({exc.msg} at column {exc.colno}). "
                "Fix or remove that line."
            ) from None
        except RecursionError:
            raise AlignkitError(f"{path}: line {number} is nested too deeply to read.") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except RecursionError:
        raise AlignkitError(f"{path}: the JSON is nested too deeply to read.") from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved with a .json name
            yield from _read_jsonl(path)
            return
        raise AlignkitError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}). "
            "Fix the file, or save one record per line as .jsonl."
        ) from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise AlignkitError(
                f"{path}: expected a list of records (or an object holding one list)."
            )
        data = lists[0]
    if not isinstance(data, list):
        raise AlignkitError(f"{path}: expected a list of records.")
    for index, record in enumerate(data, start=1):
        yield f"row {index}", record


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(1 << 30)  # long texts are ordinary in training data
    rows = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        for index, record in enumerate(rows, start=1):
            yield f"row {index}", record
    except csv.Error as exc:
        raise AlignkitError(f"{path}: line {rows.line_num} is not valid CSV ({exc}).") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise AlignkitError(
            f"{path}: not a readable parquet file ({exc}). Re-export it, or save it as .jsonl."
        ) from None
    for index, record in enumerate(table.to_pylist(), start=1):
        yield f"row {index}", record


JSON_KINDS = {type(None): "null", list: "array", str: "string", bool: "boolean", int: "number"}
JSON_KINDS[float] = "number"

READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _slice_bounds(split: str, total: int, path: Path) -> tuple[str, int, int]:
    match = SLICE.match(split.strip())
    if not match:
        raise AlignkitError(
            f"{path}: cannot read split '{split}'; write it like train or train[:1000] or "
            "train[10%:]."
        )

    def bound(text: str | None, default: int) -> int:
        if not text:
            return default
        if text.endswith("%"):
            return round(total * int(text[:-1]) / 100)
        return int(text)

    start, stop = bound(match["start"], 0), bound(match["stop"], total)
    return match["split"], *slice(start, stop).indices(total)[:2]


def read_local(path: Path, split: str = "train") -> list[tuple[str, Any]]:
    """Records of a local file as (row label, record), sliced like `train[:N]`."""
    reader = READERS.get(_base_suffix(path))
    if reader is None:
        raise AlignkitError(
            f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)} (optionally .gz)."
        )
    try:
        rows = list(reader(path))
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise AlignkitError(
            f"{path}: not a complete gzip file ({exc}). Re-compress it, or pass the "
            "uncompressed file."
        ) from None
    _, start, stop = _slice_bounds(split, len(rows), path)
    return rows[start:stop]


def read_hub(source: DataSource) -> list[tuple[str, Any]]:
    """Records of a hub dataset id (or a local dataset folder) through `datasets`."""
    import datasets

    try:
        data = datasets.load_dataset(source.path, source.name, split=source.split)
    except (ConnectionError, OSError, FileNotFoundError) as exc:
        raise AlignkitError(
            f"Could not load dataset '{source.path}': it is not a local file, and the Hugging Face "
            "Hub could not be reached (this machine looks offline) or has no such dataset. Pass a "
            f"local .json/.jsonl/.parquet/.csv file. Details: {exc}"
        ) from None
    except ValueError as exc:
        raise AlignkitError(f"Dataset '{source.path}': {exc}") from None
    return [(f"row {i}", record) for i, record in enumerate(data, start=1)]


def read_records(source: DataSource) -> list[tuple[str, Any]]:
    path = Path(source.path).expanduser()
    if path.is_file():
        return read_local(path, source.split)
    if path.suffix in LOCAL_SUFFIXES or path.suffix == ".gz":
        if path.is_dir():
            raise AlignkitError(
                f"Data file '{source.path}' is a directory, not a file. Pass the data file "
                "itself (or a saved dataset folder, whose name has no file suffix)."
            )
        raise AlignkitError(f"Data file '{source.path}' does not exist.")
    return read_hub(source)


def is_local(source: DataSource) -> bool:
    """Whether a source names a local file (or what would be one, were it there)."""
    path = Path(source.path).expanduser()
    return path.is_file() or path.suffix in (*LOCAL_SUFFIXES, ".gz")


def hub_format(source: DataSource) -> Format:
    """The format of a hub dataset, detected from its first rows (streamed, not downloaded)."""
    from datasets import load_dataset

    split = source.split.split("[", 1)[0]
    try:
        stream = load_dataset(source.path, source.name, split=split, streaming=True)
        rows = [(f"row {i}", dict(r)) for i, r in zip(range(1, 4), stream, strict=False)]
    except Exception as exc:  # noqa: BLE001 - any hub failure is reported the same way
        raise AlignkitError(f"Dataset '{source.path}' ({split}) could not be read: {exc}") from None
    return pick_format(source, rows)


def check_source(source: DataSource, kinds: tuple[str, ...], hub: bool, who: str) -> str:
    """A note on what `source` holds; an error when it is not one of `kinds` of data.

    Local files are read whole; hub datasets are sampled when `hub` is reachable.
    """
    if is_local(source):
        _, report = load_source(source)
        name, kind, what = report.format, report.kind, f"{report.used} rows"
    elif hub:
        fmt = hub_format(source)
        name, kind, what = fmt.name, fmt.kind, "hub dataset"
    else:
        return f"{source.path}: hub dataset, not checked (hub unreachable)"
    if kind not in kinds:
        raise AlignkitError(
            f"{who} needs {' or '.join(kinds)} data; '{source.path}' holds {kind} data ({name})."
        )
    return f"{source.path}: {name}, {what}"


def pick_format(source: DataSource, records: list[tuple[str, Any]]) -> Format:
    if source.format != "auto":
        if source.format not in FORMATS:
            raise AlignkitError(
                f"Unknown data format '{source.format}' for {source.path}. Known formats:\n{formats_help()}"
            )
        return FORMATS[source.format]
    if not records:
        raise AlignkitError(f"{source.path}: no records to read.")
    where, first = records[0]
    if not isinstance(first, dict):
        kind = JSON_KINDS.get(type(first), type(first).__name__)
        raise AlignkitError(
            f"{source.path}: {where} is a JSON {kind}, not an object with fields. Each "
            f"record must be an object. Known formats:\n{formats_help()}"
        )
    fmt = detect_format(first)
    if fmt is None:
        keys = ", ".join(first) if isinstance(first, dict) else type(first).__name__
        raise AlignkitError(
            f"{source.path}: {where} has fields [{keys}], which match no known format"
            f"{_closest_format(first)}. Rename the fields or pass --format. Known formats:\n{formats_help()}"
        )
    return fmt


def _closest_format(record: Any) -> str:
    if not isinstance(record, dict):
        return ""
    best = max(
        FORMATS.values(), key=lambda f: sum(name in record for name in f.fields) / len(f.fields)
    )
    missing = [name for name in best.fields if name not in record]
    if len(missing) == len(best.fields):
        return ""
    return f" (closest: '{best.name}', which also needs {', '.join(repr(m) for m in missing)})"


def convert_records(
    source: DataSource, records: list[tuple[str, Any]], fmt: Format, strict: bool
) -> tuple[list[Example], SourceReport]:
    report = SourceReport(source.path, fmt.name, fmt.kind, rows=len(records))
    examples = []
    for where, record in records:
        try:
            if not isinstance(record, dict):
                raise RowProblem(f"expected an object, got {type(record).__name__}")
            examples.append(fmt.convert(record))
        except RowProblem as problem:
            if problem.skip and not strict:
                report.skipped[str(problem)] += 1
                continue
            hint = " (or leave out --strict to skip such rows)" if problem.skip else ""
            raise AlignkitError(
                f"{source.path}: {where}: {problem} (format '{fmt.name}' needs fields "
                f"{', '.join(fmt.fields)}). Fix the row or remove it{hint}."
            ) from None
    report.used = len(examples)
    return examples, report


def load_source(source: DataSource, strict: bool = False) -> tuple[list[Example], SourceReport]:
    records = read_records(source)
    return convert_records(source, records, pick_format(source, records), strict)


def weighted_subset(examples: list[Example], weight: float, rng: random.Random) -> list[Example]:
    """`weight` x the rows: a random subset below 1, whole repeats plus a subset above 1."""
    if weight < 0:
        raise AlignkitError(f"A source weight must be non-negative; got {weight}.")
    whole, fraction = int(weight), weight - int(weight)
    return examples * whole + rng.sample(examples, round(len(examples) * fraction))


def load_mixture(
    sources: list[DataSource], strict: bool = False, seed: int = 42
) -> tuple[list[Example], list[SourceReport]]:
    """Load and mix several sources (all of one kind: SFT, pairs or feedback)."""
    if not sources:
        raise AlignkitError(
            "No data sources given; set data.sources (a path or a list of sources)."
        )
    rng = random.Random(seed)
    mixed: list[Example] = []
    reports = []
    for source in sources:
        examples, report = load_source(source, strict)
        if reports and report.kind != reports[0].kind:
            raise AlignkitError(
                f"Cannot mix {reports[0].kind} data ({reports[0].path}) with {report.kind} data "
                f"({report.path}); use one kind per stage."
            )
        chosen = weighted_subset(examples, source.weight, rng)
        report.used = len(chosen)
        mixed += chosen
        reports.append(report)
    if len(sources) > 1:
        rng.shuffle(mixed)
    return mixed, reports

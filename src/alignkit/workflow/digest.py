"""Digests of what a stage reads from disk, for its fingerprint: cheap, but never blind.

A local file up to `HASHED_BYTES` counts by its content; a larger one (weights, dataset
shards, a GGUF) by its size and modification time, as do a directory's files once
`HASHED_BYTES` of it have been read: deciding what to skip never reads gigabytes. A directory (a model, a saved dataset) counts by its files' relative paths
and their digests; a LoRA adapter dir with the model it names as its base. A name that
is no local path (a hub id) counts by itself: the recipe holds it and model.revision.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alignkit import models

HASHED_BYTES = 32 << 20


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path, budget: int = HASHED_BYTES) -> str:
    """By content when the file fits in `budget` bytes, else by size and mtime."""
    stat = path.stat()
    if stat.st_size <= budget:
        return f"sha256 {models.file_sha256(path)[:16]}"
    return f"size {stat.st_size} mtime_ns {stat.st_mtime_ns}"


def dir_digest(path: Path) -> str:
    """The files' relative paths and digests; `HASHED_BYTES` of content read in all."""
    listing, budget = {}, HASHED_BYTES
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        listing[str(file.relative_to(path))] = digest = file_digest(file, budget)
        if digest.startswith("sha256"):
            budget -= file.stat().st_size
    return short_hash(json.dumps(listing, sort_keys=True))


def path_digest(name: str) -> str | None:
    """A local file's or directory's digest (`~` expanded); None for no local path."""
    path = Path(name).expanduser()
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        return dir_digest(path)
    return None


def model_digest(name: str, seen: tuple[Path, ...] = ()) -> str:
    """A model spec by content where it is local (`default`: the bundled GGUF), else by name."""
    if name in models.DEFAULT_MODEL_NAMES:
        return f"bundled {file_digest(models.bundled_gguf_path())}"
    local = path_digest(name)
    if local is None:
        return f"hub {name}"
    path = Path(name).expanduser().resolve()
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file() and path not in seen:  # a loop is refused when loading
        base = model_digest(models.adapter_base(adapter_config), (*seen, path))
        return short_hash(f"{local} on {base}")
    return local

"""Writing outputs so a reader, or a crash, never sees half of one: temporaries beside
the target renamed into place, earlier outputs kept aside, a full disk named."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TextIO

from alignkit.errors import AlignkitError
from alignkit.rundir.names import PREVIOUS
from alignkit.rundir.read import read_metrics


def _process_umask() -> int:
    """The umask, read where the kernel shows it (setting it to read it would race threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it, once, at import
    os.umask(mask)
    return mask


UMASK = _process_umask()


def _default_mode(directory: bool) -> int:
    """The mode a plain open() or mkdir() would give: tempfile's 0600 / 0700, which keep
    other users out, would otherwise travel to the final file."""
    return (0o777 if directory else 0o666) & ~UMASK


TEMP_SUFFIX = "?" * 8  # tempfile's random part: `.tmp-<name>.` is followed by 8 characters


def remove_temporaries(directory: Path, name: str, keep_old: bool = False) -> None:
    """Clear what a killed write of `name` (a glob pattern) left in `directory` (only for
    outputs one process writes at a time): its temporaries are deleted; an `.old-` copy,
    the earlier output caught between two renames, is deleted or with `keep_old` kept
    in .previous/."""
    for stale in directory.glob(f".tmp-{name}.{TEMP_SUFFIX}"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    for old in directory.glob(f".old-{name}.{TEMP_SUFFIX}"):
        if keep_old:
            old.rename(previous_path(directory / name))
        else:
            shutil.rmtree(old, ignore_errors=True)


def _temporary_sibling(path: Path, directory: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make = tempfile.mkdtemp if directory else tempfile.mkstemp
    made = make(prefix=f".tmp-{path.name}.", dir=path.parent)
    if isinstance(made, tuple):  # mkstemp: (fd, name)
        os.close(made[0])
        made = made[1]
    os.chmod(made, _default_mode(directory))
    return Path(made)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    tmp = _temporary_sibling(path, directory=False)
    try:
        with disk_full_named(path):
            yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(
    path: Path, existing: Literal["replace", "aside", "keep"] = "replace"
) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it becomes `path`.

    An existing `path` is replaced: moved aside, the new one renamed in, the old one then
    removed (a crash between the two renames leaves the old one as `.old-<name>.*`, which
    the next replacing write removes). With `existing="aside"` the old one is kept under
    `.previous/` beside it instead; with `existing="keep"` it stays and the new one is
    discarded (another process made the same thing first). Replacing writes clear what
    an earlier, killed write of the same path left behind.
    """
    if existing != "keep" and path.parent.is_dir():
        remove_temporaries(path.parent, path.name, keep_old=existing == "aside")
    tmp = _temporary_sibling(path, directory=True)
    try:
        with disk_full_named(path):
            yield tmp
        if existing == "keep":
            _rename_unless_there(tmp, path)
            return
        _replace_dir(tmp, path, keep_old=existing == "aside")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MIN_FREE_BYTES = 1 << 20  # below this, a failed write is taken for a full disk


class DiskFull(AlignkitError):
    """A write failed because the file system holding it is full."""


def is_disk_full(exc: BaseException, where: Path) -> bool:
    """ENOSPC, said as an errno or in the text, or a writer's own error (safetensors can
    report a short write as a position mismatch) on a file system that is all but full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc) or "os error 28" in str(exc):
        return True  # a writer in another language (safetensors' Rust) names it in text
    try:
        return shutil.disk_usage(nearest_existing(where)).free < MIN_FREE_BYTES
    except OSError:
        return False


def disk_full_error(path: Path) -> DiskFull:
    return DiskFull(
        f"No space left on the device holding '{path.parent}' (writing '{path.name}'). "
        f"Nothing was replaced: an earlier '{path.name}' is intact and no partial file is "
        "left. Free some space, then run the command again (a training run: with --resume, "
        "from its last complete checkpoint)."
    )


@contextmanager
def disk_full_named(path: Path) -> Iterator[None]:
    """Turn a write that failed on a full disk into a `DiskFull` naming the place."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if is_disk_full(exc, path.parent):
            raise disk_full_error(path) from None
        raise


def publish(staged: Path, out: Path, last: str) -> None:
    """Move every file of `staged` into `out`, each in one rename, `last` at the end: a
    reader finds either the earlier files or whole new ones, and `last` only when all
    the others are in place."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staged.iterdir())
    for name in [n for n in names if n != last] + [n for n in names if n == last]:
        target = out / name
        if target.is_dir() and not (staged / name).is_dir():
            shutil.rmtree(target)
        os.replace(staged / name, target)


def _replace_dir(tmp: Path, path: Path, keep_old: bool) -> None:
    old = _move_aside(path)
    try:
        tmp.rename(path)
    except OSError:
        if old is not None:
            old.rename(path)  # put the old one back
        raise
    if old is not None and keep_old:
        old.rename(previous_path(path))
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


def previous_path(path: Path) -> Path:
    """A free `.previous/<name>-<time>` beside `path`, where replaced outputs are kept."""
    stem = path.parent / PREVIOUS / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = stem, 1
    while target.exists():  # two set-asides within one second
        n += 1
        target = stem.with_name(f"{stem.name}-{n}")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def set_aside(path: Path) -> Path | None:
    """Move an earlier output out of the way, kept under `.previous/` beside it."""
    if not path.exists():
        return None
    target = previous_path(path)
    path.rename(target)
    return target


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _rename_unless_there(tmp: Path, path: Path) -> None:
    try:
        tmp.rename(path)
    except OSError:
        if not path.exists():
            raise


def _move_aside(path: Path) -> Path | None:
    if not path.exists():
        return None
    aside = Path(tempfile.mkdtemp(prefix=f".old-{path.name}.", dir=path.parent))
    aside.rmdir()
    path.rename(aside)
    return aside


def write_text(path: Path, text: str) -> Path:
    """UTF-8 text, written atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path, data: Any) -> Path:
    """Indented JSON, written atomically."""
    return write_text(path, json.dumps(data, indent=2, default=str))


def metrics_line(record: dict[str, float]) -> str:
    return json.dumps(record) + "\n"


def append_metrics(path: Path, record: dict[str, float]) -> None:
    """One record at the end of a metrics.jsonl (a line is appended, never rewritten)."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(metrics_line(record))


def open_log(path: Path) -> TextIO:
    """A log file opened for appending (a resumed or repeated run adds to it), line by
    line: what a killed run logged is on disk. Its directory is made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8", buffering=1)


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the records past `step`: what a killed run logged after the checkpoint it
    resumes from, which the resumed run logs again (rewritten atomically)."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    write_text(path, "".join(metrics_line(r) for r in kept))

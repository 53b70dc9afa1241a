"""Checks on an output directory, made before any work is done."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from alignkit.errors import AlignkitError
from alignkit.rundir.write import nearest_existing


def check_output_dir(out: Path, inputs: list[Path]) -> None:
    """Before any work: `out` is (or can become) a writable directory holding no input."""
    if out.is_symlink() and not out.exists():
        raise AlignkitError(
            f"Output '{out}' is a symbolic link to nothing ('{os.readlink(out)}'). Remove it "
            "or choose another output directory."
        )
    if out.exists() and not out.is_dir():
        raise AlignkitError(
            f"Output '{out}' is a file, not a directory. Choose another output directory."
        )
    for item in inputs:
        resolved = item.resolve()
        if resolved == out.resolve() or out.resolve() in resolved.parents:
            raise AlignkitError(
                f"Output directory '{out}' holds '{item}', an input of this command (model, "
                "adapter or data); writing there could destroy it. Choose another output "
                "directory."
            )
    base = nearest_existing(out)
    if not base.is_dir():
        raise AlignkitError(
            f"Output directory '{out}' would be inside '{base}', which is a file. Choose "
            "another output directory."
        )
    problem = _unwritable(base, probe=base != out.absolute())
    if problem:
        raise AlignkitError(
            f"Cannot write the output directory '{out}': '{base}' is not writable "
            f"({problem}). Choose another output directory."
        )


def check_movable(path: Path) -> None:
    """`path` can be moved aside or replaced whole: not the working dir, not a mount point."""
    what = "a mount point" if os.path.ismount(path) else None
    if path.resolve() == Path.cwd().resolve():
        what = "the current directory"
    if what:
        raise AlignkitError(
            f"'{path}' is {what}, so it cannot be moved aside or replaced. Choose a new "
            "directory (inside it, for instance) as the output."
        )


def _unwritable(directory: Path, probe: bool) -> str | None:
    """Why files cannot be made in `directory` (None when they can). An existing output
    dir is only inspected; an ancestor is probed with a directory made and removed."""
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        return "read-only file system"
    if not os.access(directory, os.W_OK | os.X_OK):
        return "permission denied"
    if probe:
        try:
            shutil.rmtree(tempfile.mkdtemp(prefix=".alignkit-write-test-", dir=directory))
        except OSError as exc:
            return exc.strerror
    return None

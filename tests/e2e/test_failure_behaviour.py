"""What is left on disk when a run is overwritten, merged over, or runs out of disk space.

The disk-full cases run on a small tmpfs (root can mount one here; elsewhere they skip
and say why): the command must exit 2 naming the full device, leave no partial file and
no temporary, keep what was there before, and a training run must resume once space is
free.
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import write_jsonl

from alignkit import rundir
from alignkit.cli import main

ROWS = [{"instruction": f"Say {w}.", "output": f"{w} {w}"} for w in ("red", "blue", "green", "tea")]


def sft_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sft",
        "--model",
        str(model),
        "--data.sources",
        str(data),
        "--output-dir",
        str(out),
        "--model.adapter",
        "lora",
        "--lora.r",
        "2",
        "--train.max_steps",
        "2",
        "--train.micro_batch_size",
        "2",
        "--train.save_steps",
        "1",
        *extra,
    ]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "d.jsonl", ROWS)


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the disk-full cases are not run")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name)


def test_overwrite_moves_the_old_run_aside_and_resume_never_meets_its_checkpoints(
    tmp_path, tiny_model_dir, data
):
    out = tmp_path / "run"
    assert main(sft_argv(tiny_model_dir, data, out, "--train.max_steps", "3")) == 0
    assert {p.name for p in rundir.checkpoints(out)} == {"checkpoint-2", "checkpoint-3"}
    (out / "notes.txt").write_text("mine")
    assert main(sft_argv(tiny_model_dir, data, out, "--overwrite")) == 0
    assert {p.name for p in rundir.checkpoints(out)} == {"checkpoint-1", "checkpoint-2"}
    assert not (out / "notes.txt").exists()
    kept = list((tmp_path / rundir.PREVIOUS).iterdir())
    assert len(kept) == 1 and (kept[0] / "notes.txt").read_text() == "mine"
    assert (kept[0] / "checkpoint-3").is_dir()


def test_merge_overwrite_keeps_the_old_output_aside(tmp_path, tiny_model_dir, data):
    adapter = tmp_path / "adapter"
    assert main(sft_argv(tiny_model_dir, data, adapter)) == 0
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "mine.txt").write_text("keep")
    assert main(["merge", str(adapter), "--out", str(merged), "--overwrite"]) == 0
    assert (merged / "model.safetensors").is_file() and not (merged / "mine.txt").exists()
    kept = list((tmp_path / rundir.PREVIOUS).iterdir())
    assert [p.name for p in kept[0].iterdir()] == ["mine.txt"]


def test_merge_onto_a_full_disk_is_named_and_keeps_the_old_output(
    tmp_path, tiny_model_dir, data, capsys
):
    adapter = tmp_path / "adapter"
    assert main(sft_argv(tiny_model_dir, data, adapter)) == 0
    with tmpfs(tmp_path / "small", "2m") as disk:
        merged = disk / "merged"
        merged.mkdir()
        (merged / "mine.txt").write_text("keep")
        code = main(["merge", str(adapter), "--out", str(merged), "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and "No space left" in err and "Traceback" not in err
        assert [p.name for p in merged.iterdir()] == ["mine.txt"]
        assert leftovers(disk) == []


def test_training_onto_a_full_disk_is_named_then_resumes(tmp_path, tiny_model_dir, data, capsys):
    with tmpfs(tmp_path / "small", "1m") as disk:
        out = disk / "run"
        code = main(sft_argv(tiny_model_dir, data, out))
        err = capsys.readouterr().err
        assert code == 2 and "No space left" in err and "Traceback" not in err
        assert not (out / rundir.RUN_INFO).exists()  # not a finished run
        assert leftovers(disk) == []
        for path in out.rglob("*.json"):  # every JSON that is there is whole
            rundir.read_json(path)
        resize(disk, "64m")
        assert main(sft_argv(tiny_model_dir, data, out, "--resume")) == 0
        assert (out / rundir.RUN_INFO).is_file() and (out / "adapter_model.safetensors").is_file()
        assert len(rundir.read_metrics(out / rundir.METRICS)) == 2


def test_the_current_directory_trains_but_is_never_moved_aside(
    tmp_path, tiny_model_dir, data, monkeypatch, capsys
):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(sft_argv(tiny_model_dir, data, Path("."))) == 0
    assert (here / rundir.RUN_INFO).is_file() and leftovers(here) == []
    assert main(sft_argv(tiny_model_dir, data, Path("."), "--overwrite")) == 2
    assert "current directory" in capsys.readouterr().err
    assert (here / rundir.RUN_INFO).is_file()


def test_a_mount_point_takes_training_outputs_and_is_never_replaced_whole(
    tmp_path, tiny_model_dir, data, capsys
):
    with tmpfs(tmp_path / "volume", "64m") as volume:
        assert main(sft_argv(tiny_model_dir, data, volume)) == 0
        assert (volume / rundir.RUN_INFO).is_file() and leftovers(volume) == []
        code = main(["merge", str(volume), "--out", str(volume), "--overwrite"])
        assert code == 2 and "holds" in capsys.readouterr().err
        adapter = tmp_path / "adapter"
        assert main(sft_argv(tiny_model_dir, data, adapter)) == 0
        code = main(["merge", str(adapter), "--out", str(volume), "--overwrite"])
        assert code == 2 and "mount point" in capsys.readouterr().err
        assert (volume / rundir.RUN_INFO).is_file()


class Planted:
    """What an attacker pickles into a run dir: loading it touches a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_resume_refuses_a_planted_optimizer_pickle_and_runs_none_of_it(
    tmp_path, tiny_model_dir, data, capsys
):
    import torch

    out = tmp_path / "run"
    assert main(sft_argv(tiny_model_dir, data, out)) == 0
    last = rundir.checkpoints(out)[-1]
    (out / rundir.RUN_INFO).unlink()  # an unfinished run: --resume loads its checkpoint
    marker = tmp_path / "pwned"
    torch.save({"state": Planted(str(marker))}, last / "optimizer.bin")  # Accelerate's name
    assert main(sft_argv(tiny_model_dir, data, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "optimizer.bin" in err and "holds more than tensors" in err
    assert not marker.exists()

"""The run directory's one writer and its readers."""

from __future__ import annotations

import json

import pytest

from alignkit import rundir
from alignkit.errors import AlignkitError


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    path = rundir.write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), rundir.atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary left behind


def test_atomic_dir_replaces_a_whole_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_text("from an earlier run")
    with rundir.atomic_dir(out) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["weights"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_failure_leaves_the_old_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    with pytest.raises(OSError), rundir.atomic_dir(out) as tmp:
        (tmp / "weights").write_text("half")
        raise OSError("disk full")
    assert (out / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_keep_leaves_what_another_process_made(tmp_path):
    out = tmp_path / "cache"
    with rundir.atomic_dir(out, existing="keep") as tmp:
        (tmp / "config.json").write_text("mine")
        out.mkdir()  # another process finished first
        (out / "config.json").write_text("theirs")
    assert (out / "config.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_checkpoints_list_complete_ones_in_step_order(tmp_path):
    for step in (10, 2, 4):
        path = rundir.checkpoint_dir(tmp_path, step)
        path.mkdir()
        (path / rundir.CHECKPOINT_STATE).write_text("{}")
    rundir.checkpoint_dir(tmp_path, 12).mkdir()  # no state.json: incomplete
    assert [rundir.checkpoint_step(p) for p in rundir.checkpoints(tmp_path)] == [2, 4, 10]


def test_metric_readers(tmp_path):
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "eval_loss": 2.5}, {"step": 3, "loss": 1.0}]
    path = tmp_path / rundir.METRICS
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    assert rundir.read_metrics(path) == records
    assert rundir.read_metrics(tmp_path / "missing.jsonl") == []
    assert rundir.metric_values(records, "loss") == [3.0, 1.0]
    assert rundir.last_value(records, "loss") == 1.0
    assert rundir.last_value(records, "lr") is None
    assert rundir.first_last(records, "eval_loss") == (2.5, 2.5)
    assert rundir.first_last(records, "lr") is None


def test_held_out_reward_accuracy_carries_its_standard_error():
    records = [
        {"step": 0, "eval_rewards/accuracies": 0.5, "eval_units": 150},
        {"step": 32, "loss": 0.9, "eval_rewards/accuracies": 2 / 3, "eval_units": 150},
    ]
    # binomial: sqrt(p (1 - p) / n) over the 150 held-out pairs
    assert "eval reward accuracy 0.500 → 0.667 ± 0.038 (150 pairs)" in rundir.training_figures(
        records
    )
    assert "eval reward accuracy 0.6667 ± 0.0385 (150 pairs)" in rundir.training_figures(
        records[1:]
    )
    # logs written before the count was logged: the figure alone
    assert rundir.training_figures([{"eval_rewards/accuracies": 2 / 3, "eval_loss": 0.5}]).endswith(
        "eval reward accuracy 0.6667"
    )


def test_load_results_accepts_files_model_dirs_and_eval_dirs(tmp_path):
    for name in ("base", "tuned"):
        rundir.write_json(tmp_path / name / rundir.RESULTS, {"model": name, "summary": {}})
    assert [r["model"] for r in rundir.load_results([tmp_path])] == ["base", "tuned"]
    assert [r["model"] for r in rundir.load_results([tmp_path / "tuned"])] == ["tuned"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(AlignkitError, match="not an alignkit eval results.json"):
        rundir.load_results([tmp_path / "bad.json"])
    with pytest.raises(AlignkitError, match="No eval results"):
        rundir.load_results([tmp_path / "nothing"])


def test_written_files_and_dirs_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        file = rundir.write_json(tmp_path / "results.json", {"a": 1})
        with rundir.atomic_dir(tmp_path / "merged") as tmp:
            (tmp / "weights").write_text("w")
    finally:
        os.umask(mask)
    assert file.stat().st_mode & 0o777 == 0o644  # not tempfile's 0600
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o755  # not 0700


def test_a_replacing_write_clears_what_a_killed_write_left(tmp_path):
    out = tmp_path / "merged"
    (tmp_path / ".tmp-merged.abcd1234").mkdir()  # a write killed mid-way
    (tmp_path / ".old-merged.efgh5678").mkdir()  # killed between the two renames
    (tmp_path / ".tmp-merged-other.abcd1234").mkdir()  # other outputs' temporaries: kept
    (tmp_path / ".tmp-merged.v2.abcd1234").mkdir()
    with rundir.atomic_dir(out) as tmp:
        (tmp / "weights").write_text("w")
    kept = [".tmp-merged-other.abcd1234", ".tmp-merged.v2.abcd1234", "merged"]
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


def test_a_write_that_keeps_the_old_output_keeps_one_caught_between_renames(tmp_path):
    (tmp_path / ".old-merged.efgh5678").mkdir()
    (tmp_path / ".old-merged.efgh5678" / "weights").write_text("old")
    with rundir.atomic_dir(tmp_path / "merged", existing="aside") as tmp:
        (tmp / "weights").write_text("new")
    (kept,) = (tmp_path / rundir.PREVIOUS).iterdir()
    assert (kept / "weights").read_text() == "old"


def test_a_failed_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    real_rename = type(out).rename

    def failing(self, target):
        if str(self.name).startswith(".tmp-"):
            raise OSError("rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(type(out), "rename", failing)
    with pytest.raises(OSError), rundir.atomic_dir(out) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "old"

"""Stage fingerprints: what a stage reads from disk counts by content, a hub id by name."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from support import write_jsonl

from alignkit.workflow import load_workflow
from alignkit.workflow.state import assign_fingerprints

ROWS = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(4)]
PAIRS = [{"prompt": f"Q{i}", "chosen": "yes", "rejected": "no"} for i in range(4)]
BIG = 64 << 20  # a weights file too big to read on every run: sparse, so nothing is written


def fake_model(path):
    """A model dir as the fingerprint sees it: a small config and a big weights file."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"rope_theta": 10000.0}))
    with open(path / "model.safetensors", "wb") as handle:
        handle.truncate(BIG)
    return path


def inputs(tmp_path, monkeypatch):
    """Every kind of local input of a sft -> pref workflow; `~` is tmp_path/home."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    write_jsonl(home / "sft.jsonl", ROWS)
    folder = tmp_path / "pairs-dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", PAIRS)
    (tmp_path / "template.jinja").write_text("{{ messages }}")
    with open(tmp_path / "model.gguf", "wb") as handle:
        handle.truncate(BIG)
    return {
        "sft": home / "sft.jsonl",
        "base": fake_model(tmp_path / "base"),
        "ref": fake_model(tmp_path / "ref"),
        "folder": folder,
        "template": tmp_path / "template.jinja",
    }


def write_workflow(tmp_path, base: str, ref: str) -> str:
    recipe = {
        "model": {"name_or_path": base, "chat_template": str(tmp_path / "template.jinja")},
        "stages": [
            {"stage": "sft", "data": {"sources": ["~/sft.jsonl"]}},
            {
                "stage": "pref",
                "data": {"sources": [str(tmp_path / "pairs-dataset")]},
                "pref": {"ref_model": ref},
            },
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def prints(path: str) -> dict[str, str]:
    workflow = load_workflow(path)
    assign_fingerprints(workflow)
    return {stage.id: stage.fingerprint for stage in workflow.stages}


def rewrite_keeping_times(path, text: str) -> None:
    """New content, same size and modification time: only a content hash sees it."""
    stat = path.stat()
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def touch_later(path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


EDITS = {
    "data-file-under-home": (
        lambda p: rewrite_keeping_times(p["sft"], p["sft"].read_text().replace("Say 0", "Say 9")),
        {"sft", "pref"},
    ),
    "dataset-folder": (
        lambda p: write_jsonl(p["folder"] / "more.jsonl", PAIRS),
        {"pref"},
    ),
    "jinja-template": (
        lambda p: rewrite_keeping_times(p["template"], "{{ message }}!"),
        {"sft", "pref"},
    ),
    "base-config": (
        lambda p: rewrite_keeping_times(p["base"] / "config.json", '{"rope_theta": 50000.0}'),
        {"sft", "pref"},
    ),
    "base-weights-modified": (
        lambda p: touch_later(p["base"] / "model.safetensors"),
        {"sft", "pref"},
    ),
    "ref-weights-resized": (
        lambda p: os.truncate(p["ref"] / "model.safetensors", BIG + 1),
        {"pref"},
    ),
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_changed_local_input_changes_the_stages_that_read_it(tmp_path, monkeypatch, edit):
    paths = inputs(tmp_path, monkeypatch)
    path = write_workflow(tmp_path, str(paths["base"]), str(paths["ref"]))
    before = prints(path)
    assert prints(path) == before  # nothing changed: nothing reruns
    change, stages = EDITS[edit]
    change(paths)
    after = prints(path)
    assert {s for s in before if before[s] != after[s]} == stages


def test_a_gguf_base_counts_by_its_file_and_a_hub_id_by_its_name(tmp_path, monkeypatch):
    paths = inputs(tmp_path, monkeypatch)
    gguf = tmp_path / "model.gguf"
    path = write_workflow(tmp_path, str(gguf), "org/reference")
    before = prints(path)
    touch_later(gguf)
    assert prints(path)["sft"] != before["sft"]
    shutil.rmtree(paths["ref"])  # no local dir of that name either way: a hub id
    again = prints(path)
    assert prints(path) == again
    other = write_workflow(tmp_path, str(gguf), "org/other-reference")
    assert prints(other)["pref"] != again["pref"] and prints(other)["sft"] == again["sft"]


def test_the_default_model_counts_by_its_bundled_file(tmp_path, monkeypatch):
    inputs(tmp_path, monkeypatch)
    bundled = tmp_path / "bundled.gguf"
    bundled.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setattr("alignkit.models.bundled_gguf_path", lambda: bundled)
    path = write_workflow(tmp_path, "default", "org/reference")
    before = prints(path)
    assert prints(write_workflow(tmp_path, "smollm2-135m-instruct", "org/reference")) == before
    bundled.write_bytes(b"GGUF" + bytes(65))  # the package upgraded its model
    assert prints(write_workflow(tmp_path, "default", "org/reference"))["sft"] != before["sft"]

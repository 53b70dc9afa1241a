"""`alignkit push`: what goes up, in one commit, to which repository; the card's metadata
checked offline; and clear errors without a token or a network (the Hub is never called:
HfApi's calls are replaced)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml
from huggingface_hub import constants
from support import free_port, write_jsonl

from alignkit.config import load_recipe
from alignkit.errors import AlignkitError
from alignkit.merge import merge_adapter
from alignkit.push import Upload, card_problems, hub_base, push
from alignkit.train.sft import train_sft

ROWS = [{"instruction": f"Say {w}.", "output": f"{w} {w}"} for w in ["red", "blue", "gold"]]
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A LoRA SFT run (2 steps, one checkpoint) and the model merged from it."""
    root = tmp_path_factory.mktemp("push")
    data = write_jsonl(root / "rows.jsonl", ROWS)
    overrides = {
        "model.name_or_path": str(tiny_model_dir),
        "model.adapter": "lora",
        "data.sources": str(data),
        "train.output_dir": str(root / "sft"),
        "train.micro_batch_size": "2",
        "train.max_steps": "2",
        "train.save_steps": "1",
    }
    adapter = train_sft(load_recipe(None, list(overrides.items())))
    return {"adapter": adapter, "merged": merge_adapter(str(adapter), root / "merged")}


@pytest.fixture
def hub(monkeypatch):
    """HfApi's repository, branch and commit calls, recorded instead of sent."""
    calls: dict[str, list] = {"create_repo": [], "create_branch": [], "create_commit": []}

    def record(name, result=None):
        def call(self, *args, **kwargs):
            calls[name].append((args, kwargs))
            return result

        return call

    commit = SimpleNamespace(commit_url="https://huggingface.co/me/tiny/commit/abc")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    for name in ("create_repo", "create_branch"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, record(name))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", record("create_commit", commit))
    return calls


def uploaded(calls) -> dict[str, bytes | str]:
    ((_, kwargs),) = calls["create_commit"]
    return {op.path_in_repo: op.path_or_fileobj for op in kwargs["operations"]}


def card_meta(files) -> dict:
    return yaml.safe_load(files["README.md"].decode().split("---")[1])


def test_a_merged_model_goes_up_in_one_commit_with_card_and_curves(runs, hub):
    url = push(str(runs["merged"]), "me/tiny", private=True, revision="v1", say=lambda _: None)
    assert url.endswith("/commit/abc")
    assert hub["create_repo"] == [(("me/tiny",), {"private": True, "exist_ok": True})]
    assert hub["create_branch"] == [(("me/tiny",), {"branch": "v1", "exist_ok": True})]
    ((args, kwargs),) = hub["create_commit"]
    assert args == ("me/tiny",) and kwargs["revision"] == "v1"
    files = uploaded(hub)
    assert set(files) == MODEL_FILES | TOKENIZER_FILES | {"README.md", "training_curves.png"}
    assert files["model.safetensors"] == str(runs["merged"] / "model.safetensors")
    meta = card_meta(files)
    assert meta["library_name"] == "transformers" and "sft" in meta["tags"]
    assert "base_model" not in meta  # the tiny base is a local path, not a Hub id
    assert "## Training" in files["README.md"].decode()  # rendered from the training record


def test_an_adapter_goes_up_as_an_adapter_without_checkpoints(runs, hub):
    push(str(runs["adapter"]), "me/tiny-lora", say=lambda _: None)
    assert hub["create_repo"] == [(("me/tiny-lora",), {"private": False, "exist_ok": True})]
    assert hub["create_branch"] == []  # main
    files = uploaded(hub)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert not set(files) & MODEL_FILES and not any("checkpoint" in f for f in files)
    assert card_meta(files)["library_name"] == "peft"


def test_an_adapter_on_a_local_copy_of_a_hub_model_names_the_hub_id(tmp_path):
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"base_model_name_or_path": str(tmp_path), "r": 8}))
    weights = Upload("adapter_model.safetensors", b"...")
    uploads, notes = hub_base([Upload(config.name, config), weights], "org/base")
    assert json.loads(uploads[0].source) == {"base_model_name_or_path": "org/base", "r": 8}
    assert uploads[1] is weights and "goes up as 'org/base'" in notes[0]
    assert hub_base([Upload(config.name, config)], None)[1] == []  # no hub id known: as is


def test_dry_run_lists_files_and_sizes_and_calls_nothing(runs, hub, monkeypatch):
    said: list[str] = []
    monkeypatch.delenv("HF_TOKEN")
    assert push("default", "me/smol", dry_run=True, say=said.append) is None
    text = "\n".join(said)
    assert "-> me/smol (public, revision main)" in text and "card metadata valid" in text
    assert "model.safetensors" in text and " MB" in text and "nothing was uploaded" in text
    assert all(not v for v in hub.values())


def test_without_network_or_token_the_push_fails_clearly(runs, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(AlignkitError, match="No Hugging Face token"):
        push(str(runs["merged"]), "me/tiny", say=lambda _: None)
    monkeypatch.undo()
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # read when huggingface_hub loads
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(AlignkitError, match=f"Could not reach the Hugging Face Hub at {endpoint}"):
        push(str(runs["merged"]), "me/tiny", say=lambda _: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(AlignkitError, match="offline mode is on"):
        push(str(runs["merged"]), "me/tiny", say=lambda _: None)


GOOD = {
    "license": "apache-2.0",
    "library_name": "transformers",
    "pipeline_tag": "text-generation",
    "tags": ["alignkit"],
}


def card(**changes) -> str:
    return "---\n" + yaml.safe_dump({**GOOD, **changes}) + "---\n# model\n"


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"base_model": "/home/me/models/base"}, "is not a Hub model id"),
        ({"tags": ["alignkit", 3]}, "tags must be a list of strings"),
        ({"model-index": [{"name": "x", "results": [{"task": {}}]}]}, "does not parse"),
        ({"license": 3}, "license must be a non-empty string"),
    ],
)
def test_card_metadata_the_hub_would_refuse_is_named(changes, problem):
    assert card_problems(card()) == []
    assert any(problem in p for p in card_problems(card(**changes)))


def test_a_bad_repo_id_or_a_dir_without_weights_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(AlignkitError, match="needs its owner"):
        push(str(tiny_model_dir), "tiny", dry_run=True)
    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(AlignkitError, match="holds no model weights"):
        push(str(tmp_path), "me/tiny", dry_run=True)

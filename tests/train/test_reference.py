"""The reference log-prob cache: keyed by what decides the reference's outputs."""

from __future__ import annotations

import json
import shutil

import torch

from alignkit.config import ModelConfig
from alignkit.data.tokenize import TokenizedPair
from alignkit.models import load_model
from alignkit.train.reference import cached_reference, model_fingerprint

PAIRS = [TokenizedPair([1, 5, 6], [7, 8, 2], [9, 2]), TokenizedPair([1, 10], [11, 2], [12, 2])]


def copy_with_rope_theta(source, target, theta: float):
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = theta
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_same_weights_with_another_rope_theta_get_their_own_cache(
    tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    theta = json.loads((tiny_model_dir / "config.json").read_text())["rope_parameters"]
    same = copy_with_rope_theta(tiny_model_dir, tmp_path / "same", theta["rope_theta"])
    other = copy_with_rope_theta(tiny_model_dir, tmp_path / "rope", 500_000.0)
    models = {
        name: load_model(ModelConfig(name_or_path=str(path)))
        for name, path in {"base": tiny_model_dir, "same": same, "rope": other}.items()
    }
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12, 13]])
    with torch.no_grad():  # the rope change alters the function, not the weights
        logits = {name: m(input_ids=ids).logits for name, m in models.items()}
    assert not torch.allclose(logits["base"], logits["rope"])
    calls = []

    def compute(name):
        calls.append(name)
        return torch.zeros(len(PAIRS), 2)

    for name in ("base", "same", "rope"):
        fp = model_fingerprint(models[name])
        cached_reference(PAIRS, fp, "padded batch=2 chunk=0", lambda n=name: compute(n))
    assert calls == ["base", "rope"]  # another path with the same config reuses the cache


def test_the_data_key_counts_which_completion_tokens_are_scored():
    from alignkit.data.tokenize import TokenizedPair
    from alignkit.train.reference import data_fingerprint

    whole = TokenizedPair([1, 2], [3, 4, 5], [6, 7])
    masked = TokenizedPair([1, 2], [3, 4, 5], [6, 7], chosen_mask=[False, True, True])
    assert data_fingerprint([whole], "m") != data_fingerprint([masked], "m")

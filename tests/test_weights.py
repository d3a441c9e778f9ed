"""model/weights.py: a weight file holds the state dict, its config and what produced it, each read
back apart, and a save that dies midway never costs the file it was replacing."""

import json

import pytest
import torch

from model import weights
from model.loader import load_pth
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.weights import atomic_save, previous_version, read_weights, save_weights, sidecar_path
from test_model import make_model

TRAIN_ARGS = {"train_args": {"learning_rate": 5e-4, "data_path": "dataset/demo/sft.jsonl", "commit": "f058b60"}}


def test_round_trip_keeps_weights_config_and_extra_apart(tmp_path):
    model = make_model(qk_norm=True)  # not MiniMindConfig()'s layout: the config must come from the file
    path = tmp_path / "full_sft_64.pth"
    save_weights(model, path, TRAIN_ARGS)
    state, config, extra = read_weights(path)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(state[k].dtype == torch.float16 and torch.equal(state[k], v.half()) for k, v in expected.items())
    assert extra == TRAIN_ARGS
    # The extra sits at the sidecar's top level, yet is no part of the config read back.
    assert json.loads(sidecar_path(path).read_text())["train_args"] == TRAIN_ARGS["train_args"]
    assert not hasattr(config, "train_args") and config.to_json_string() == model.config.to_json_string()
    twin = MiniMindForCausalLM(config)
    twin.load_state_dict(state, strict=True)


def test_without_extra_the_sidecar_is_the_config_json(tmp_path):
    model = make_model()
    save_weights(model, tmp_path / "pretrain_64.pth")
    assert (tmp_path / "pretrain_64.json").read_text(encoding="utf-8") == model.config.to_json_string()
    assert read_weights(tmp_path / "pretrain_64.pth")[2] == {}
    sidecar_path(tmp_path / "pretrain_64.pth").unlink()  # as the original's releases: no sidecar
    assert read_weights(tmp_path / "pretrain_64.pth")[1:] == (None, {})


def test_extras_the_reader_would_take_for_config_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hidden_size"):
        save_weights(make_model(), tmp_path / "m.pth", {"hidden_size": 128})
    assert not any(tmp_path.iterdir())


class Killed(BaseException):
    """Stands for a kill -9 halfway through writing a file."""


def test_a_save_killed_midway_leaves_the_old_file_readable(tmp_path, monkeypatch):
    path = tmp_path / "full_sft_64.pth"
    old, new = make_model(seed=0), make_model(seed=1)
    save_weights(old, path)
    real_save = torch.save

    def dies_halfway(obj, handle):
        real_save(obj, tmp_path / "whole")
        handle.write((tmp_path / "whole").read_bytes()[:1000])
        raise Killed

    monkeypatch.setattr(weights.torch, "save", dies_halfway)
    with pytest.raises(Killed):
        save_weights(new, path)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(f".{path.name}.tmp")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 1000  # the half-written file is there...
    state, _, _ = read_weights(path)  # ...and never read: the old weights are
    assert all(torch.equal(state[k], v.half()) for k, v in old.state_dict().items())
    monkeypatch.setattr(weights.torch, "save", real_save)
    save_weights(new, path)  # the next save goes through beside the leftover
    state, _, _ = read_weights(path)
    assert all(torch.equal(state[k], v.half()) for k, v in new.state_dict().items())


def test_keep_previous_keeps_the_replaced_file(tmp_path):
    path = tmp_path / "sft_64_resume.pth"
    atomic_save({"step": 1}, path)
    atomic_save({"step": 2}, path, keep_previous=True)
    assert previous_version(path) == tmp_path / "sft_64_resume.previous.pth"
    assert torch.load(path)["step"] == 2 and torch.load(previous_version(path))["step"] == 1
    atomic_save({"step": 3}, path)  # without keep_previous the kept file stays as it was
    assert torch.load(path)["step"] == 3 and torch.load(previous_version(path))["step"] == 1


def test_load_pth_takes_the_sidecars_config_over_the_fallback(tmp_path):
    model = make_model(num_hidden_layers=3)
    save_weights(model, tmp_path / "m.pth", TRAIN_ARGS)
    loaded = load_pth(tmp_path / "m.pth", MiniMindConfig())  # MiniMind2-Small: fits nothing in this file
    assert loaded.config.num_hidden_layers == 3 and not hasattr(loaded.config, "train_args")

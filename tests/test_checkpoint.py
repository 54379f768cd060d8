"""worldmodel.checkpoint: the one format, atomic writes, and a clear error for every bad file."""

from __future__ import annotations

import pytest
import torch

from worldmodel import checkpoint
from worldmodel.checkpoint import FORMAT, MODEL_KEYS, TRAINING_KEYS, model_payload, read_checkpoint, write_checkpoint
from worldmodel.model import ModelConfig, WorldModel


def _payload(**extra) -> dict:
    return model_payload({"latent_dim": 2}, {"w": torch.arange(6.0).reshape(2, 3)}, **extra)


def test_round_trip_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "checkpoint.pt"
    training = _payload(train_config={"steps": 3}, step=2, optimizer={"state": {}}, rng=[{"torch": torch.ones(2)}])
    write_checkpoint(path, training)
    ckpt = read_checkpoint(path, require=TRAINING_KEYS)
    assert ckpt.keys() == set(TRAINING_KEYS) and ckpt["format"] == FORMAT and ckpt["step"] == 2
    assert torch.equal(ckpt["state_dict"]["w"], training["state_dict"]["w"])
    assert read_checkpoint(path)["config"] == {"latent_dim": 2}  # a training checkpoint is also a model one
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_worldmodel_save_and_load_share_the_format(tmp_path):
    model = WorldModel.from_config(ModelConfig(encoder="mlp", input_dim=5, latent_dim=2, action_dim=0))
    model.save(tmp_path / "model.pt")
    assert read_checkpoint(tmp_path / "model.pt").keys() == set(MODEL_KEYS)
    write_checkpoint(tmp_path / "ours.pt", model_payload(model.config.to_dict(), model.state_dict()))
    loaded = WorldModel.load(tmp_path / "ours.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_each_bad_file_has_its_own_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="text.pt.*not a torch file"):
        read_checkpoint(tmp_path / "text.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt.*not an ldm-worldmodel checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not an ldm-worldmodel checkpoint"):
        read_checkpoint(tmp_path / "list.pt")
    write_checkpoint(tmp_path / "model.pt", _payload())
    with pytest.raises(ValueError, match="model.pt.*not a training checkpoint \\(saved by WorldModel.save; has no "
                                         "train_config"):
        read_checkpoint(tmp_path / "model.pt", require=TRAINING_KEYS)
    partial = _payload(train_config={}, step=1)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt.*incomplete checkpoint \\(has no optimizer, rng"):
        read_checkpoint(tmp_path / "partial.pt", require=TRAINING_KEYS)
    with pytest.raises(ValueError, match="model_payload"):
        write_checkpoint(tmp_path / "bad.pt", {"state_dict": {}})


def test_a_failing_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(path, _payload(step=1))
    before = path.read_bytes()

    def crash(obj, f):  # half a file, then the disk fills up
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="No space"):
        write_checkpoint(path, _payload(step=2))
    assert path.read_bytes() == before and read_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]

"""Checkpoints: manifest of sizes and sha256, verified on load, fallback to the newest intact one."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vespo.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


class Net(torch.nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, 2)

    def forward(self, x):
        return self.b(self.a(x))


def _save(run, step, net=None, **kw):
    net = net or Net()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float(step))
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 4)).sum().backward()
    opt.step()
    return save_checkpoint(
        run, step, model=net, optimizer=opt, tensors={"x": torch.arange(3)}, state={"hello": step}, **kw
    )


def _value(net):
    return float(net.a.bias.detach()[0])


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    path = _save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    files = {p.name for p in path.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size and len(entry["sha256"]) == 64
    assert verify_checkpoint(path) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "empty_state", "manifest"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, damage):
    """Defect 2: a truncated model.safetensors was a SafetensorError traceback."""
    _save(tmp_path, 1)
    latest = _save(tmp_path, 2)
    target = latest / "model.safetensors"
    if damage == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one byte changed: only the checksum sees it
        data = bytearray(target.read_bytes())
        data[-3] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    elif damage == "empty_state":
        (latest / "state.json").write_text("")
    else:
        (latest / "manifest.json").write_text("{not json")
    net = Net()
    ckpt = load_checkpoint(tmp_path, model=net, optimizer=torch.optim.AdamW(net.parameters()))
    assert ckpt.state["step"] == 1 and ckpt.path.name == "step_000001"
    assert ckpt.skipped and ckpt.skipped[0][0].name == "step_000002"
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "step_000002" in err[0] and "step_000001" in err[0]
    # the weights are those of step 1 (every parameter was filled with 1 before one Adam step)
    assert abs(_value(net) - 1.0) < 0.01


def test_no_intact_checkpoint_is_one_line_naming_the_file(tmp_path):
    latest = _save(tmp_path, 1)
    target = latest / "model.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, model=Net())
    text = str(info.value)
    assert "model.safetensors" in text and "\n" not in text and "intact" in text


def test_a_checkpoint_of_another_model_shape_is_one_summarised_line(tmp_path):
    """Defect 8: a resume with another hidden size printed 39 lines of size mismatches."""
    _save(tmp_path, 1, net=Net(4))

    class Wide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 2)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, model=Wide())
    text = str(info.value)
    assert "\n" not in text and "3 tensors differ in shape" in text and "a.weight [8, 8] vs [4, 4]" in text
    assert len(text) < 400


def test_legacy_checkpoint_without_manifest_still_loads(tmp_path):
    latest = _save(tmp_path, 3)
    (latest / "manifest.json").unlink()
    net = Net()
    assert load_checkpoint(tmp_path, model=net).state["step"] == 3


def test_latest_pointer_behind_a_newer_complete_checkpoint(tmp_path):
    """A kill between renaming the checkpoint and moving 'latest': the newer one is used."""
    _save(tmp_path, 1)
    _save(tmp_path, 2, keep_last=5)
    (tmp_path / "checkpoints" / "latest").write_text("step_000001")
    assert latest_checkpoint(tmp_path).name == "step_000002"
    assert load_checkpoint(tmp_path, model=Net()).state["step"] == 2


def test_leftover_temporary_directory_is_ignored_and_pruned(tmp_path):
    _save(tmp_path, 1)
    leftover = tmp_path / "checkpoints" / ".tmp_step_000002_abc"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert load_checkpoint(tmp_path, model=Net()).state["step"] == 1
    _save(tmp_path, 2)
    assert not leftover.exists()


def test_disk_full_while_writing_is_an_oserror_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC from safetensors (a Rust error, not an OSError) becomes OSError(ENOSPC) naming the file."""
    import errno

    import vespo.train.checkpoint as ck

    _save(tmp_path, 1)
    real = ck.save_file

    def full(tensors, path, *a, **k):  # the real writer, on a device that is always full
        return real(tensors, "/dev/full", *a, **k)

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(OSError) as info:  # the write was lost silently: the check after it sees it
        _save(tmp_path, 2)
    assert info.value.errno in (errno.ENOSPC, errno.EIO) and "safetensors" in str(info.value.filename)

    def short(tensors, path, *a, **k):  # a file cut short on a full disk
        real(tensors, path, *a, **k)
        os.truncate(path, os.path.getsize(path) // 2)

    monkeypatch.setattr(ck, "save_file", short)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(OSError) as info:
        _save(tmp_path, 2)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(ck, "save_file", real)
    assert load_checkpoint(tmp_path, model=Net()).state["step"] == 1
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_verify_can_be_switched_off(tmp_path):
    latest = _save(tmp_path, 1)
    data = bytearray((latest / "extra.safetensors").read_bytes())
    data[-1] ^= 0x01  # a changed value byte: the file still parses
    (latest / "extra.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path, model=Net())
    assert load_checkpoint(tmp_path, model=Net(), verify=False).state["step"] == 1


def test_fsync_failure_is_not_swallowed(tmp_path, monkeypatch):
    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        _save(tmp_path, 1)

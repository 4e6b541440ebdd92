"""The hf sampler engine: mu (rollout log-probs), top-p, precision mismatch, partial rollouts, padding."""

from __future__ import annotations

import math

import pytest
import torch

from vespo.rollout.batch import Rollout, RolloutBatch
from vespo.rollout.log_probs import sequence_log_probs, sequence_log_probs_and_entropy
from vespo.rollout.sampler import Sampler, sample_tokens
from vespo.train.models import build_tiny_model

VOCAB = 48
PAD, EOS = 0, 2
# Three "EOS" ids so that random policies stop at different steps (a few percent per step).
EOS_SET = [2, 5, 6]


def tiny(arch: str = "llama", seed: int = 0, init_std: float = 0.2):
    return build_tiny_model(
        arch, vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, seed=seed, init_std=init_std
    )


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(8, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 1, 6, 12, 4)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def full_forward(model, rollout: Rollout, temperature: float = 1.0) -> tuple[RolloutBatch, torch.Tensor]:
    padded = rollout.to_batch(PAD)
    with torch.no_grad():
        logp = sequence_log_probs(
            model, padded.input_ids, padded.attention_mask, padded.response_length, temperature=temperature
        )
    return padded, logp


# --------------------------------------------------------------------------------------------------
# mu == pi of the same weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,temperature", [("llama", 1.0), ("llama", 0.7), ("llama", 1.6), ("qwen2", 1.0), ("qwen3_moe", 0.8)]
)
def test_rollout_log_probs_match_full_forward(arch, temperature, prompts):
    model = tiny(arch)
    sampler = Sampler(model)
    rollout = sampler.generate(
        prompts * 3,
        max_new_tokens=14,
        temperature=temperature,
        generator=gen(1),
        eos_token_id=EOS_SET,
        pad_token_id=PAD,
    )
    # EOS at different steps, and rows that ran to the limit.
    assert len({n for n, f in zip(rollout.response_lengths, rollout.finished) if f}) >= 2
    assert not all(rollout.finished)
    for resp, fin in zip(rollout.response_ids, rollout.finished):
        assert fin == (resp[-1] in EOS_SET)
        assert all(t not in EOS_SET for t in resp[:-1])
    padded, logp = full_forward(model, rollout, temperature)
    m = padded.response_mask
    assert torch.allclose(logp[m], padded.rollout_log_prob[m], atol=1e-5, rtol=0)
    assert (padded.token_version[m] == 0).all()


def test_equal_length_prompts_match_full_forward(model):
    """No padding at all: the sampler skips the 2D attention mask."""
    g = gen(9)
    prompts = [torch.randint(8, VOCAB, (5,), generator=g).tolist() for _ in range(6)]
    rollout = Sampler(model).generate(
        prompts, max_new_tokens=10, temperature=1.2, generator=gen(2), eos_token_id=EOS_SET, pad_token_id=PAD
    )
    padded, logp = full_forward(model, rollout, 1.2)
    m = padded.response_mask
    assert torch.allclose(logp[m], padded.rollout_log_prob[m], atol=1e-5, rtol=0)


def test_logprobs_match_without_pruning(model, prompts):
    """The in-loop batch pruning of finished rows changes neither the samples nor mu."""
    kw = {"max_new_tokens": 12, "generator": None, "eos_token_id": EOS_SET, "pad_token_id": PAD}
    a = Sampler(model).generate(prompts, **{**kw, "generator": gen(5)}, prune_finished=True)
    b = Sampler(model).generate(prompts, **{**kw, "generator": gen(5)}, prune_finished=False)
    assert a.response_ids == b.response_ids
    for x, y in zip(a.rollout_log_probs, b.rollout_log_probs):
        assert x == pytest.approx(y, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# top-p
# --------------------------------------------------------------------------------------------------


def test_top_p_log_prob_is_renormalised_nucleus_by_hand():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).clone()
    tokens, logp = sample_tokens(logits, top_p=0.7, generator=gen(0))
    # Nucleus for top_p = 0.7 is {0, 1} (0.5 < 0.7, 0.5 + 0.3 >= 0.7), renormalised by 0.8.
    assert set(tokens.tolist()) == {0, 1}
    expected = torch.where(tokens == 0, torch.tensor(math.log(0.5 / 0.8)), torch.tensor(math.log(0.3 / 0.8)))
    assert torch.allclose(logp, expected, atol=1e-6)
    assert (tokens == 0).float().mean().item() == pytest.approx(0.625, abs=0.03)
    # Temperature is applied before the truncation: T=0.5 squares and renormalises the probabilities.
    sq = probs**2 / (probs**2).sum()  # [0.694, 0.25, ...] -> top_p=0.7 keeps {0, 1}
    tokens, logp = sample_tokens(logits, temperature=0.5, top_p=0.7, generator=gen(1))
    keep = sq[:2].sum()
    expected = torch.where(tokens == 0, (sq[0] / keep).log(), (sq[1] / keep).log())
    assert set(tokens.tolist()) == {0, 1}
    assert torch.allclose(logp, expected, atol=1e-6)
    # top_p small enough keeps only the argmax: log-prob 0.
    tokens, logp = sample_tokens(logits[:10], top_p=0.4, generator=gen(2))
    assert (tokens == 0).all() and torch.allclose(logp, torch.zeros(10))


def test_top_p_in_sampler_matches_truncated_full_distribution(model, prompts):
    temperature, top_p = 0.9, 0.8
    rollout = Sampler(model).generate(
        prompts,
        max_new_tokens=8,
        temperature=temperature,
        top_p=top_p,
        generator=gen(2),
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    padded = rollout.to_batch(PAD)
    p_len, t_len = padded.prompt_length, padded.response_length
    with torch.no_grad():
        logits = (
            model(
                input_ids=padded.input_ids,
                attention_mask=padded.attention_mask,
                position_ids=(padded.attention_mask.cumsum(-1) - 1).clamp_min(0),
            )
            .logits[:, p_len - 1 : p_len + t_len - 1]
            .double()
        )
    probs = torch.softmax(logits / temperature, dim=-1)
    for i in range(len(rollout)):
        for j, tok in enumerate(rollout.response_ids[i]):
            p = probs[i, j]
            order = torch.argsort(p, descending=True)
            cum, kept = 0.0, []
            for k in order.tolist():  # smallest set of top tokens with mass >= top_p
                kept.append(k)
                cum += p[k].item()
                if cum >= top_p:
                    break
            assert tok in kept
            expected = math.log(p[tok].item() / cum)
            assert rollout.rollout_log_probs[i][j] == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# greedy, determinism
# --------------------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_deterministic(model, prompts):
    s = Sampler(model)
    a = s.generate(prompts, max_new_tokens=6, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
    b = s.generate(prompts, max_new_tokens=6, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
    assert a == b
    padded = a.to_batch(PAD)
    with torch.no_grad():
        out = model(
            input_ids=padded.input_ids,
            attention_mask=padded.attention_mask,
            position_ids=(padded.attention_mask.cumsum(-1) - 1).clamp_min(0),
        ).logits
    p = padded.prompt_length
    argmax = out[:, p - 1 : -1].argmax(-1)
    m = padded.response_mask
    assert torch.equal(argmax[m], padded.response_ids[m])
    # mu for greedy is the untempered log-prob.
    _, logp = full_forward(model, a)
    assert torch.allclose(logp[m], padded.rollout_log_prob[m], atol=1e-5)


def test_seeded_generator_is_deterministic(model, prompts):
    kw = {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.95, "eos_token_id": EOS, "pad_token_id": PAD}
    a = Sampler(model).generate(prompts, generator=gen(7), **kw)
    b = Sampler(model).generate(prompts, generator=gen(7), **kw)
    c = Sampler(model).generate(prompts, generator=gen(8), **kw)
    assert a == b
    assert a.response_ids != c.response_ids


# --------------------------------------------------------------------------------------------------
# engine mismatch: bf16 sampler vs fp32 trainer
# --------------------------------------------------------------------------------------------------


def test_bf16_sampler_has_small_real_mismatch(model, prompts):
    sampler = Sampler(model, dtype=torch.bfloat16)
    assert sampler.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the trainer's model is untouched
    rollout = sampler.generate(prompts * 2, max_new_tokens=12, generator=gen(3), eos_token_id=EOS, pad_token_id=PAD)
    padded, logp = full_forward(model, rollout)
    diff = (logp - padded.rollout_log_prob)[padded.response_mask].abs()
    assert diff.max().item() > 1e-4  # the mismatch is real
    assert diff.mean().item() < 0.1  # but small
    assert torch.isfinite(padded.rollout_log_prob).all()


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_reference_scores_the_tempered_distribution_the_engine_sampled(model, prompts, temperature):
    """The async workers' reference pass measures engine mismatch only: an fp32 engine and an fp32
    reference at the sampling temperature agree, whatever the temperature (it once scored at 1)."""
    from vespo.rollout.reference import ReferencePolicy

    sampler = Sampler(model, dtype=torch.float32)
    rollout = sampler.generate(
        prompts, max_new_tokens=10, generator=gen(5), eos_token_id=EOS, pad_token_id=PAD, temperature=temperature
    )
    reference = ReferencePolicy(model, dtype=torch.float32, pad_id=PAD, temperature=temperature)
    out: list[list[float]] = [[] for _ in range(len(rollout))]
    reference.score_segment(rollout, [0] * len(rollout), out)
    for ref, mu in zip(out, rollout.rollout_log_probs):
        assert len(ref) == len(mu)
        assert max(abs(a - b) for a, b in zip(ref, mu)) < 1e-4
    with pytest.raises(ValueError, match="temperature"):
        ReferencePolicy(model, dtype=torch.float32, pad_id=PAD, temperature=0.0)


# --------------------------------------------------------------------------------------------------
# partial rollouts
# --------------------------------------------------------------------------------------------------


def test_partial_rollout_resume_under_new_weights(model, prompts):
    k = 4
    sampler = Sampler(model, policy_version=3)
    calls = {"n": 0}

    def stop_after_k() -> bool:  # polled before every step: True on call k + 1 -> k tokens
        calls["n"] += 1
        return calls["n"] > k

    first = sampler.generate(
        prompts, max_new_tokens=16, generator=gen(4), eos_token_id=EOS, pad_token_id=PAD, stop_flag=stop_after_k
    )
    assert all(len(r) <= k for r in first.response_ids)
    assert all(len(r) == k for r, f in zip(first.response_ids, first.finished) if not f)
    assert not all(first.finished)
    assert all(v == 3 for vs in first.token_versions for v in vs)

    new_model = tiny(seed=1)  # "the trainer took a step": different weights, version + 1
    sampler.load_state_dict(new_model.state_dict(), version=4)
    assert sampler.policy_version == 4
    resumed = sampler.generate(
        first.prompt_ids,
        max_new_tokens=16,
        generator=gen(5),
        eos_token_id=EOS,
        pad_token_id=PAD,
        resume=first,
    )
    padded, logp_new = full_forward(new_model, resumed)
    grew = False
    for i in range(len(resumed)):
        n_old = len(first.response_ids[i])
        assert resumed.response_ids[i][:n_old] == first.response_ids[i]
        assert resumed.rollout_log_probs[i][:n_old] == first.rollout_log_probs[i]
        assert resumed.token_versions[i][:n_old] == [3] * n_old
        n = len(resumed.response_ids[i])
        assert resumed.token_versions[i][n_old:] == [4] * (n - n_old)
        assert n <= 16
        if first.finished[i]:
            assert n == n_old and resumed.finished[i]
        else:
            grew |= n > n_old
            # new tokens: mu equals the NEW policy's log-prob, with the old tokens in context
            new_mu = padded.rollout_log_prob[i, n_old:n]
            assert torch.allclose(logp_new[i, n_old:n], new_mu, atol=1e-5)
    assert grew
    assert all(f or len(r) == 16 for r, f in zip(resumed.response_ids, resumed.finished))


def test_stop_flag_before_prefill_returns_unfinished_empty(model, prompts):
    r = Sampler(model).generate(
        prompts, max_new_tokens=5, generator=gen(0), eos_token_id=EOS, pad_token_id=PAD, stop_flag=lambda: True
    )
    assert r.response_ids == [[] for _ in prompts] and r.finished == [False] * len(prompts)


def test_continuation_counts_towards_max_new_tokens(model):
    r = Sampler(model).generate(
        [[9, 10, 11]],
        max_new_tokens=5,
        generator=gen(0),
        eos_token_id=-1,
        pad_token_id=PAD,
        resume=Rollout([[9, 10, 11]], [[12, 13]], [[-1.0, -2.0]], [[0, 0]], [False]),
    )
    assert len(r.response_ids[0]) == 5 and r.response_ids[0][:2] == [12, 13] and not r.finished[0]
    no_eos = Sampler(model).generate(
        [[9]] * 4, max_new_tokens=30, generator=gen(0), eos_token_id=None, pad_token_id=None
    )
    assert no_eos.response_lengths == [30] * 4 and not any(no_eos.finished)
    with pytest.raises(ValueError):
        Sampler(model).generate(
            [[9]],
            max_new_tokens=2,
            eos_token_id=EOS,
            pad_token_id=PAD,
            resume=Rollout([[9], [9]], [[1], [1]], [[0.0], [0.0]], [[0], [0]], [False, False]),
        )


# --------------------------------------------------------------------------------------------------
# padding, sequence_log_probs, sampler copy semantics
# --------------------------------------------------------------------------------------------------


def test_to_batch_layout():
    r = Rollout(
        prompt_ids=[[5, 6, 7], [8]],
        response_ids=[[9, EOS], [10, 11, 12]],
        rollout_log_probs=[[-0.1, -0.2], [-0.3, -0.4, -0.5]],
        token_versions=[[1, 1], [1, 2, 2]],
        finished=[True, False],
    )
    p = r.to_batch(PAD)
    assert p.prompt_length == 3 and p.response_length == 3
    assert p.input_ids.tolist() == [[5, 6, 7, 9, EOS, PAD], [PAD, PAD, 8, 10, 11, 12]]
    assert p.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert p.response_mask.tolist() == [[True, True, False], [True, True, True]]
    assert torch.allclose(p.rollout_log_prob, torch.tensor([[-0.1, -0.2, 0.0], [-0.3, -0.4, -0.5]]))
    assert p.token_version.tolist() == [[1, 1, -1], [1, 2, 2]]
    assert p.finished.tolist() == [True, False]
    assert p.response_ids.tolist() == [[9, EOS, PAD], [10, 11, 12]]
    assert r.select([1]).response_ids == [[10, 11, 12]]
    assert len(Rollout.concat([r, r.select([0])])) == 3


def test_sequence_log_probs_entropy_and_grad(model, prompts):
    rollout = Sampler(model).generate(prompts, max_new_tokens=6, generator=gen(0), eos_token_id=EOS, pad_token_id=PAD)
    padded = rollout.to_batch(PAD)
    args = (padded.input_ids, padded.attention_mask, padded.response_length)
    trainer = tiny()
    trainer.train()
    logp, ent = sequence_log_probs_and_entropy(trainer, *args, temperature=1.3)
    assert logp.requires_grad and logp.shape == padded.response_mask.shape
    m = padded.response_mask
    assert ((ent[m] > 0) & (ent[m] <= math.log(VOCAB) + 1e-5)).all()
    assert (logp[~m] == 0).all() and (ent[~m] == 0).all()
    (logp * m).sum().backward()
    assert trainer.model.embed_tokens.weight.grad is not None
    trainer.eval()
    assert not sequence_log_probs(trainer, *args).requires_grad
    # entropy by hand at one position
    with torch.no_grad():
        logits = trainer(
            input_ids=padded.input_ids,
            attention_mask=padded.attention_mask,
            position_ids=(padded.attention_mask.cumsum(-1) - 1).clamp_min(0),
        ).logits
    q = torch.softmax(logits[0, padded.prompt_length - 1] / 1.3, -1)
    assert ent[0, 0].item() == pytest.approx(-(q * q.log()).sum().item(), abs=1e-5)


def test_sampler_owns_a_frozen_copy(prompts):
    model = tiny()
    sampler = Sampler(model)
    assert sampler.model is not model and not sampler.model.training
    assert all(not p.requires_grad for p in sampler.model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    before = sampler.generate(prompts, max_new_tokens=5, generator=gen(0), eos_token_id=EOS, pad_token_id=PAD)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    again = sampler.generate(prompts, max_new_tokens=5, generator=gen(0), eos_token_id=EOS, pad_token_id=PAD)
    assert again == before  # the trainer's update does not leak into the sampler
    bf = Sampler(tiny(), dtype=torch.bfloat16)
    bf.load_state_dict(model.state_dict())  # version=None increments
    assert bf.policy_version == 1 and bf.dtype == torch.bfloat16
    w = bf.model.model.embed_tokens.weight
    assert torch.equal(w, model.model.embed_tokens.weight.detach().to(torch.bfloat16))
    with pytest.raises(KeyError):
        bf.load_state_dict({"nonsense.weight": torch.zeros(1)}, version=2)

"""Tier-1 sequence-level simulator: a toy autoregressive policy with an exact objective.

The policy has free per-position logits: for prompt ``p`` and position ``t`` the next-token
distribution is ``pi(. | p, t) = softmax(theta[p, t])`` over a vocabulary of ``V`` tokens, so

    pi(y | p) = prod_t pi(y_t | p, t)            (a product over T tokens, as in an LLM)
    log W = sum_t log pi(y_t) - log mu(y_t)      (the sequence log-ratio the losses see)

The reward is a verifier-like 0/1 check on ``K`` *key* positions spread over the response:
``R(y) = 1[#{k : y_{t_k} = z_{p,k}} >= m]`` with a hidden target ``z``. The other ``T - K``
positions are filler: they do not change the reward but every one of them enters W. Because the
positions are independent, the number of correct keys is Poisson-binomial and

    J(theta) = E_pi[R] = mean_p P(Poisson-binomial(q_{p,1..K}) >= m),  q_{p,k} = pi(z_{p,k} | p, t_k)

is computed exactly (a dynamic programme over the count), and so is its gradient (autograd).

Everything here is torch only. Runs are vectorised over ``S`` seeds: ``theta`` has shape
[S, P, T, V] and every seed has its own targets, initial logits and sampling noise. All losses come
from :func:`vespo.losses.compute_policy_loss`; nothing here re-implements a loss.

Main entry points: :func:`make_task`, :func:`expected_reward`, :func:`exact_gradient`,
:func:`sample_rollout`, :func:`train` (staleness N, mismatch, any registered loss) and
:func:`gradient_study` (bias/variance of a loss's gradient against the exact one).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vespo.advantages import group_advantages
from vespo.losses import compute_policy_loss

# ---------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """Shape of the toy problem.

    Attributes:
        vocab: V, tokens per position.
        length: T, response length (every response has exactly T tokens).
        prompts: P, prompts (contexts) per mini-batch; each has its own logits and target.
        group_size: G, responses per prompt (the GRPO group).
        keys: K, reward-relevant positions, evenly spaced over [0, T).
        need: m, correct keys needed for R = 1 (default: all K).
        init_success: J at initialisation; the target token's initial probability at the key
            positions is set so that P(Binomial(K, q0) >= m) equals it.
        init_scale: std of the random initial logits (all tokens, all positions).
    """

    vocab: int = 8
    length: int = 128
    prompts: int = 8
    group_size: int = 8
    keys: int = 8
    need: int | None = None
    init_success: float = 0.1
    init_scale: float = 4.0

    @property
    def need_(self) -> int:
        return self.keys if self.need is None else self.need

    @property
    def batch_size(self) -> int:
        """Responses per mini-batch: B = P * G."""
        return self.prompts * self.group_size

    def validate(self) -> None:
        if self.vocab < 2 or self.length < 1 or self.prompts < 1 or self.group_size < 2:
            raise ValueError("need vocab >= 2, length >= 1, prompts >= 1, group_size >= 2")
        if not 1 <= self.keys <= self.length:
            raise ValueError(f"keys must be in [1, length={self.length}], got {self.keys}")
        if not 1 <= self.need_ <= self.keys:
            raise ValueError(f"need must be in [1, keys={self.keys}], got {self.need_}")
        if not 0.0 < self.init_success < 1.0:
            raise ValueError("init_success must be in (0, 1)")


@dataclass
class Task:
    """A batch of S task instances (one per seed).

    Attributes:
        spec: the :class:`TaskSpec`.
        key_pos: [K] long, the key positions (same for every seed and prompt).
        targets: [S, P, K] long, the hidden target token at each key.
        init_logits: [S, P, T, V] float, the common initial policy of every method.
        seeds: the seeds the instances were drawn from.
    """

    spec: TaskSpec
    key_pos: torch.Tensor
    targets: torch.Tensor
    init_logits: torch.Tensor
    seeds: tuple[int, ...]


def _binomial_tail(q: float, k: int, m: int) -> float:
    """P(Binomial(k, q) >= m)."""
    return sum(math.comb(k, j) * q**j * (1 - q) ** (k - j) for j in range(m, k + 1))


def initial_key_prob(spec: TaskSpec) -> float:
    """q0 with P(Binomial(K, q0) >= m) = init_success (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _binomial_tail(mid, spec.keys, spec.need_) < spec.init_success:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def make_task(spec: TaskSpec, seeds: Sequence[int], dtype: torch.dtype = torch.float32) -> Task:
    """Draw one task instance per seed: random logits, random targets, calibrated key logits.

    Initial logits are N(0, init_scale^2). At each key the target token's logit is then set to
    logit(q0) + logsumexp(other logits), which makes pi_0(z) = q0 exactly.
    """
    spec.validate()
    s_count, p, t, v, k = len(seeds), spec.prompts, spec.length, spec.vocab, spec.keys
    key_pos = torch.linspace(0, t - 1, k).round().long() if k > 1 else torch.tensor([t // 2])
    key_pos = torch.unique(key_pos)
    if key_pos.numel() != k:  # only when K is close to T: fall back to the first K positions
        key_pos = torch.arange(k)
    logits = torch.empty(s_count, p, t, v, dtype=torch.float64)
    targets = torch.empty(s_count, p, k, dtype=torch.long)
    q0 = initial_key_prob(spec)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(10_007 * int(seed) + 17)
        logits[i] = torch.randn(p, t, v, generator=gen, dtype=torch.float64) * spec.init_scale
        targets[i] = torch.randint(0, v, (p, k), generator=gen)
    # set the target logit at each key so that softmax gives exactly q0
    key_logits = logits[:, :, key_pos, :]  # [S, P, K, V]
    tgt = targets.unsqueeze(-1)
    others = key_logits.scatter(-1, tgt, -math.inf)
    new_tgt = math.log(q0 / (1 - q0)) + torch.logsumexp(others, -1, keepdim=True)
    logits[:, :, key_pos, :] = key_logits.scatter(-1, tgt, new_tgt)
    return Task(spec=spec, key_pos=key_pos, targets=targets, init_logits=logits.to(dtype),
                seeds=tuple(int(s) for s in seeds))


def key_probs(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """[S, P, K] q = pi(z_k | p, t_k), differentiable in ``logits`` [S, P, T, V]."""
    logp = torch.log_softmax(logits[:, :, task.key_pos, :], -1)
    return logp.gather(-1, task.targets.unsqueeze(-1)).squeeze(-1).exp()


def success_prob(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """[S, P] exact P(R = 1) = P(sum_k Bernoulli(q_k) >= m), by a DP over the count."""
    q = key_probs(logits, task)
    k, m = task.spec.keys, task.spec.need_
    if m == k:  # all keys must be right: a product
        return q.prod(-1)
    # dist[..., c] = P(count = c) after the keys seen so far; c in [0, K]
    dist = torch.zeros(*q.shape[:-1], k + 1, dtype=q.dtype)
    dist[..., 0] = 1.0
    for j in range(k):
        qj = q[..., j : j + 1]
        shifted = torch.cat([torch.zeros_like(dist[..., :1]), dist[..., :-1]], -1)
        dist = dist * (1 - qj) + shifted * qj
    return dist[..., m:].sum(-1)


def expected_reward(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """[S] J(theta) = mean over prompts of P(R = 1): the exact objective (the 'accuracy')."""
    return success_prob(logits, task).mean(-1)


def exact_gradient(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """[S, P, T, V] grad of J(theta) w.r.t. the logits (zero at filler positions)."""
    x = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(expected_reward(x, task).sum(), x)
    return grad


def policy_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[S] mean per-position entropy (nats) of the policy."""
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1).mean((-1, -2))


# ---------------------------------------------------------------------------------------------
# Sampling with an optional sampler/trainer mismatch
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    """How the sampler's distribution mu differs from the trainer's pi_old (same weights).

    kind:
        ``none``: mu = pi_old.
        ``noise``: the sampler adds N(0, scale^2) to every logit, drawn afresh for every response
            and position (numerical noise that depends on the batch); mu is the perturbed softmax
            at the sampled token, which is the probability the token was actually drawn with.
        ``bf16``: the sampler rounds the logits to bfloat16 before the softmax.
        ``temperature``: the sampler divides the logits by (1 + scale).
    """

    kind: str = "none"
    scale: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "noise", "bf16", "temperature"):
            raise ValueError(f"unknown mismatch kind '{self.kind}'")

    def sampler_logits(self, logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.kind == "noise" and self.scale > 0:
            return logits + self.scale * torch.randn(logits.shape, generator=gen, dtype=logits.dtype)
        if self.kind == "bf16":
            return logits.to(torch.bfloat16).to(logits.dtype)
        if self.kind == "temperature":
            return logits / (1.0 + self.scale)
        return logits


@dataclass
class Batch:
    """One mini-batch of S x B responses (B = P * G, groups of G consecutive responses).

    Attributes:
        tokens: [S, B, T] long.
        prompt_ids: [B] long, the prompt of each response (same layout for every seed).
        old_log_prob: [S, B, T] log pi_old(y_t): the trainer's log-probs at rollout time.
        sampler_log_prob: [S, B, T] log mu(y_t): the log-probs the sampler drew the tokens with.
        rewards: [S, B] 0/1.
        staleness: optimizer steps between the rollout and the step that trains on this batch.
        behaviour_step: the optimizer step whose weights generated the batch.
    """

    tokens: torch.Tensor
    prompt_ids: torch.Tensor
    old_log_prob: torch.Tensor
    sampler_log_prob: torch.Tensor
    rewards: torch.Tensor
    staleness: int = 0
    behaviour_step: int = 0


def prompt_layout(spec: TaskSpec) -> torch.Tensor:
    """[B] prompt of each response in a mini-batch: every prompt once, G responses each."""
    return torch.arange(spec.prompts).repeat_interleave(spec.group_size)


def _pick(table: torch.Tensor, prompt_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[S, B, T] table[s, prompt_ids[b], t, tokens[s, b, t]] for a [S, P, T, V] table (no [S, B, T, V] copy)."""
    s, p, t, v = table.shape
    b = prompt_ids.numel()
    base = (torch.arange(s).reshape(s, 1, 1) * p + prompt_ids.reshape(1, b, 1)) * t + torch.arange(t).reshape(1, 1, t)
    return table.reshape(-1).take(base * v + tokens)


def token_log_probs(logits: torch.Tensor, prompt_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[S, B, T] log softmax(logits[s, prompt_ids[b], t])[tokens[s, b, t]] (differentiable)."""
    return _pick(torch.log_softmax(logits, -1), prompt_ids, tokens)


def rewards_of(tokens: torch.Tensor, prompt_ids: torch.Tensor, task: Task) -> torch.Tensor:
    """[S, B] R = 1[#correct keys >= m]."""
    hits = tokens[:, :, task.key_pos] == task.targets[:, prompt_ids]  # [S, B, K]
    return (hits.sum(-1) >= task.spec.need_).to(torch.float32)


@torch.no_grad()
def sample_batch(
    logits: torch.Tensor,
    task: Task,
    gen: torch.Generator,
    mismatch: Mismatch = Mismatch(),
    prompt_ids: torch.Tensor | None = None,
) -> Batch:
    """Sample one mini-batch from the sampler's version of ``logits`` [S, P, T, V].

    Tokens are drawn by inverse CDF from mu; pi_old is the trainer's softmax of the same logits.
    """
    pid = prompt_layout(task.spec) if prompt_ids is None else prompt_ids
    log_pi = torch.log_softmax(logits, -1)  # [S, P, T, V] trainer
    if mismatch.kind == "noise" and mismatch.scale > 0:
        # per-response noise: the sampler's distribution differs for every response
        log_mu_full = torch.log_softmax(mismatch.sampler_logits(logits[:, pid], gen), -1)  # [S, B, T, V]
        cdf = log_mu_full.exp().cumsum(-1)
    else:
        log_mu = log_pi if mismatch.kind == "none" else torch.log_softmax(mismatch.sampler_logits(logits, gen), -1)
        cdf = log_mu.exp().cumsum(-1)[:, pid]  # [S, B, T, V]
    u = torch.rand(cdf.shape[:-1] + (1,), generator=gen, dtype=cdf.dtype)
    # inverse CDF: the first token whose cumulative probability exceeds u
    tokens = torch.searchsorted(cdf.contiguous(), u * cdf[..., -1:]).squeeze(-1).clamp_max(task.spec.vocab - 1)
    if mismatch.kind == "noise" and mismatch.scale > 0:
        sampler_lp = log_mu_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        sampler_lp = _pick(log_mu, pid, tokens)
    return Batch(
        tokens=tokens,
        prompt_ids=pid,
        old_log_prob=_pick(log_pi, pid, tokens),
        sampler_log_prob=sampler_lp,
        rewards=rewards_of(tokens, pid, task),
    )


def sample_rollout(
    logits: torch.Tensor, task: Task, n_minibatches: int, gen: torch.Generator,
    mismatch: Mismatch = Mismatch(), behaviour_step: int = 0, max_chunk: int = 16,
) -> list[Batch]:
    """A rollout batch of N mini-batches, all drawn from the same behaviour weights ``logits``.

    Mini-batch k (0-based) will be trained k optimizer steps after the rollout: staleness k.
    Up to ``max_chunk`` mini-batches are sampled in one call (same distribution as one by one).
    """
    layout = prompt_layout(task.spec)
    b = layout.numel()
    out: list[Batch] = []
    while len(out) < n_minibatches:
        n = min(max_chunk, n_minibatches - len(out))
        big = sample_batch(logits, task, gen, mismatch, prompt_ids=layout.repeat(n))
        for j in range(n):
            sl = slice(j * b, (j + 1) * b)
            out.append(Batch(
                tokens=big.tokens[:, sl], prompt_ids=layout, old_log_prob=big.old_log_prob[:, sl],
                sampler_log_prob=big.sampler_log_prob[:, sl], rewards=big.rewards[:, sl],
                staleness=len(out), behaviour_step=behaviour_step,
            ))
    return out


def staleness_schedule(steps: int, n_stale: int) -> Iterator[tuple[int, int, int]]:
    """(step, staleness k, behaviour step) for each optimizer step with N = ``n_stale``.

    A rollout is drawn every N steps, from the weights before step N * floor(step / N).
    """
    for step in range(steps):
        k = step % n_stale
        yield step, k, step - k


def compute_advantages(rewards: torch.Tensor, group_size: int, mode: str = "grpo") -> torch.Tensor:
    """[S, B] advantages from [S, B] rewards (groups of G consecutive responses).

    ``grpo``: (R - mean_g) / (std_g + 1e-6) (verl's default, std unbiased).
    ``rloo``: (R - mean_g) * G / (G - 1) = R - mean of the other G - 1 (leave-one-out), which
        makes the on-policy estimator E[A grad log pi] = grad J exactly.
    ``raw``: R (no baseline).
    """
    s, b = rewards.shape
    if mode == "grpo":
        return group_advantages(rewards.reshape(-1).double(), group_size).reshape(s, b)
    grouped = rewards.double().reshape(s, -1, group_size)
    if mode == "rloo":
        return ((grouped - grouped.mean(-1, keepdim=True)) * group_size / (group_size - 1)).reshape(s, b)
    if mode == "raw":
        return rewards.double()
    raise ValueError(f"unknown advantage mode '{mode}'; use grpo, rloo or raw")


# ---------------------------------------------------------------------------------------------
# The loss on a mini-batch
# ---------------------------------------------------------------------------------------------

IS_SOURCES = ("trainer", "sampler", "tis")


def loss_on_batch(
    loss: str,
    log_prob: torch.Tensor,
    batch: Batch,
    advantages: torch.Tensor,
    *,
    is_source: str = "trainer",
    loss_params: dict[str, Any] | None = None,
    loss_agg_mode: str = "token-mean",
):
    """:func:`compute_policy_loss` on a [S, B, T] mini-batch, flattened to [S*B, T].

    ``is_source`` picks what the ratio is taken against:
        ``trainer``: old_log_prob = pi_old (the sync recipe; the sampler mismatch is ignored);
        ``sampler``: old_log_prob = mu (fully-async ``use_rollout_log_probs``: W sees staleness
            and mismatch together);
        ``tis``: old_log_prob = pi_old, rollout_log_prob = mu, correction = token_tis.
    Returns the :class:`~vespo.losses.LossOutput` of the pooled batch.
    """
    s, b, t = log_prob.shape
    kw: dict[str, Any] = dict(loss_params or {})
    if is_source == "trainer":
        old = batch.old_log_prob
    elif is_source == "sampler":
        old = batch.sampler_log_prob
    elif is_source == "tis":
        old = batch.old_log_prob
        kw.update(rollout_log_prob=batch.sampler_log_prob.reshape(s * b, t), correction="token_tis")
    else:
        raise ValueError(f"is_source must be one of {IS_SOURCES}, got '{is_source}'")
    return compute_policy_loss(
        loss,
        log_prob=log_prob.reshape(s * b, t),
        old_log_prob=old.reshape(s * b, t).to(log_prob.dtype),
        advantages=advantages.reshape(s * b).to(log_prob.dtype),
        response_mask=torch.ones(s * b, t, dtype=torch.bool),
        loss_agg_mode=loss_agg_mode,
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# Policies: logits = base (the task's initial logits, fixed) + delta(params)
# ---------------------------------------------------------------------------------------------

POLICY_KINDS = ("table", "mlp")


@dataclass(frozen=True)
class PolicySpec:
    """Which parameterisation is trained on top of the task's fixed initial logits.

    ``table``: delta = a free [P, T, V] table (every logit is its own parameter; positions and
        prompts share nothing, and Adam moves each logit independently).
    ``mlp``: delta[p, t] = tanh((e_p + f_t) W1 + b1) W2 with learned prompt and position
        embeddings e, f of width ``embed`` and ``hidden`` units. Parameters are shared across
        prompts and positions, so an update aimed at the key positions also moves the filler
        positions, as the shared weights of an LLM do. W2 starts at 0, so delta = 0 at init.
    """

    kind: str = "mlp"
    embed: int = 32
    hidden: int = 64

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"unknown policy kind '{self.kind}'; use one of {POLICY_KINDS}")


class Policy:
    """A batch of S policies (one per seed of ``task``) of the kind given by ``spec``."""

    def __init__(self, spec: PolicySpec, task: Task, dtype: torch.dtype | None = None):
        self.spec, self.task = spec, task
        dtype = dtype or task.init_logits.dtype
        self.base = task.init_logits.to(dtype)
        s_count, p, t, v = self.base.shape
        if spec.kind == "table":
            self.params = [torch.zeros(s_count, p, t, v, dtype=dtype)]
            return
        d, h = spec.embed, spec.hidden
        tensors: list[list[torch.Tensor]] = [[] for _ in range(5)]
        for seed in task.seeds:
            gen = torch.Generator().manual_seed(7_919 * seed + 3)
            tensors[0].append(torch.randn(p, d, generator=gen, dtype=dtype))  # prompt embedding
            tensors[1].append(torch.randn(t, d, generator=gen, dtype=dtype))  # position embedding
            tensors[2].append(torch.randn(d, h, generator=gen, dtype=dtype) / math.sqrt(d))  # W1
        self.params = [
            torch.stack(tensors[0]), torch.stack(tensors[1]), torch.stack(tensors[2]),
            torch.zeros(s_count, h, dtype=dtype),  # b1
            torch.zeros(s_count, h, v, dtype=dtype),  # W2
        ]

    def logits(self, params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """[S, P, T, V] logits for ``params`` (default: the policy's own)."""
        ps = self.params if params is None else params
        if self.spec.kind == "table":
            return self.base + ps[0]
        emb_p, emb_t, w1, b1, w2 = ps
        x = emb_p[:, :, None, :] + emb_t[:, None, :, :]  # [S, P, T, D]
        hid = torch.tanh(torch.einsum("sptd,sdh->spth", x, w1) + b1[:, None, None, :])
        return self.base + torch.einsum("spth,shv->sptv", hid, w2)

    def num_params(self) -> int:
        """Parameters per seed."""
        return sum(p[0].numel() for p in self.params)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class VecAdam:
    """Adam on a list of [S, ...] parameters, one independent optimiser per seed (no weight decay).

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    theta <- theta - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    With ``grad_clip`` each seed's whole gradient is first rescaled to norm <= grad_clip (verl's
    actor default is 1.0).
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, grad_clip: float | None = 1.0):
        self.params, self.lr, self.betas, self.eps, self.grad_clip = list(params), lr, betas, eps, grad_clip
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Apply one update; returns the [S] per-seed gradient norms before clipping."""
        sq = sum(g.pow(2).reshape(g.shape[0], -1).sum(1) for g in grads)
        norms = torch.as_tensor(sq).sqrt()
        scale = torch.ones_like(norms)
        if self.grad_clip is not None:
            scale = (self.grad_clip / (norms + 1e-12)).clamp(max=1.0)
        b1, b2 = self.betas
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            g = g * scale.reshape(-1, *([1] * (g.dim() - 1)))
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(self.lr * (m / (1 - b1**self.t)) / ((v / (1 - b2**self.t)).sqrt() + self.eps))
        return norms


#: per-step loss metrics kept in :class:`TrainResult`
TRACKED_METRICS = (
    "phi/mean",
    "phi/frac_below_0.01",
    "phi/ess",
    "is/abs_log_w_mean",
    "is/log_w_mean",
    "is/token_kl",
    "loss/clip_frac",
    "mismatch/seq_log_w_mean",
    "mismatch/log_prob_diff_abs_mean",
)


@dataclass
class TrainResult:
    """Learning curve of one configuration over S seeds.

    Attributes:
        eval_steps: optimizer steps at which J was evaluated (0 = the initial policy).
        reward: [len(eval_steps)][S] exact J(theta) per seed.
        entropy: same shape, mean per-position entropy of the policy (nats).
        metrics: name -> loss metric averaged over the steps of each eval window (pooled seeds).
        metrics_by_staleness: name -> [N] the same metric averaged by the mini-batch staleness k.
        staleness: [steps] k of each step; behaviour_step: [steps] the step whose weights
            sampled the mini-batch (step - k).
        grad_norm: [steps] mean over seeds of the gradient norm before clipping.
        seconds: wall time.
        params: the final parameters (only with ``keep_params``).
    """

    eval_steps: list[int]
    reward: list[list[float]]
    entropy: list[list[float]]
    metrics: dict[str, list[float]] = field(default_factory=dict)
    metrics_by_staleness: dict[str, list[float]] = field(default_factory=dict)
    staleness: list[int] = field(default_factory=list)
    behaviour_step: list[int] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    seconds: float = 0.0
    params: list[torch.Tensor] | None = None

    def final(self) -> list[float]:
        """Per-seed J at the last evaluation."""
        return list(self.reward[-1])

    def best(self) -> list[float]:
        """Per-seed best J over the evaluations after step 0."""
        rows = self.reward[1:] or self.reward
        return [max(col) for col in zip(*rows)]

    def auc(self) -> list[float]:
        """Per-seed mean J over the evaluations after step 0 (area under the learning curve)."""
        rows = self.reward[1:] or self.reward
        return [sum(col) / len(col) for col in zip(*rows)]


def train(
    loss: str,
    task: Task,
    *,
    n_stale: int,
    steps: int,
    lr: float,
    policy: PolicySpec = PolicySpec(),
    mismatch: Mismatch = Mismatch(),
    is_source: str = "trainer",
    loss_params: dict[str, Any] | None = None,
    adv_mode: str = "grpo",
    loss_agg_mode: str = "token-mean",
    grad_clip: float | None = 1.0,
    eval_every: int = 16,
    sample_seed: int = 0,
    keep_params: bool = False,
    init_params: Sequence[torch.Tensor] | None = None,
) -> TrainResult:
    """Train every seed of ``task`` from the common initial policy with ``loss`` for ``steps`` steps.

    A rollout of N = ``n_stale`` mini-batches is drawn from the current weights every N steps and
    its mini-batches are trained one after another (mini-batch k is k steps stale), so every N
    consumes the same ``steps * B`` responses. The pooled loss (token-mean over the S seeds'
    tokens) is multiplied by S so that each seed's gradient is that of its own mini-batch.
    """
    import time

    start = time.perf_counter()
    if n_stale < 1 or steps < 1:
        raise ValueError("n_stale and steps must be >= 1")
    pol = Policy(policy, task)
    theta = [p.clone() for p in (init_params if init_params is not None else pol.params)]
    for p in theta:
        p.requires_grad_(True)
    s_count = task.init_logits.shape[0]
    opt = VecAdam(theta, lr, grad_clip=grad_clip)
    gen = torch.Generator().manual_seed(sample_seed)

    def evaluate() -> tuple[list[float], list[float]]:
        with torch.no_grad():
            lg = pol.logits(theta)
            return expected_reward(lg, task).tolist(), policy_entropy(lg).tolist()

    j0, h0 = evaluate()
    eval_steps, reward, entropy = [0], [j0], [h0]
    metrics: dict[str, list[float]] = {k: [] for k in TRACKED_METRICS}
    window: dict[str, list[float]] = {k: [] for k in TRACKED_METRICS}
    by_k: dict[str, list[list[float]]] = {k: [[] for _ in range(n_stale)] for k in TRACKED_METRICS}
    stal, beh, gnorms = [], [], []
    rollout: list[Batch] = []
    for step, k, behaviour in staleness_schedule(steps, n_stale):
        if k == 0:
            with torch.no_grad():
                rollout = sample_rollout(pol.logits(theta), task, n_stale, gen, mismatch, behaviour_step=step)
        batch = rollout[k]
        if batch.staleness != k or batch.behaviour_step != behaviour:
            raise RuntimeError("staleness bookkeeping is inconsistent")
        stal.append(k)
        beh.append(batch.behaviour_step)
        log_prob = token_log_probs(pol.logits(theta), batch.prompt_ids, batch.tokens)
        adv = compute_advantages(batch.rewards, task.spec.group_size, adv_mode)
        out = loss_on_batch(loss, log_prob, batch, adv, is_source=is_source, loss_params=loss_params,
                            loss_agg_mode=loss_agg_mode)
        grads = torch.autograd.grad(out.loss * s_count, theta)
        gnorms.append(float(opt.step(grads).mean()))
        for name in TRACKED_METRICS:
            if name in out.metrics:
                window[name].append(out.metrics[name])
                by_k[name][k].append(out.metrics[name])
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            j, h = evaluate()
            eval_steps.append(step + 1)
            reward.append(j)
            entropy.append(h)
            for name in TRACKED_METRICS:
                vals = window[name]
                metrics[name].append(sum(vals) / len(vals) if vals else float("nan"))
                window[name] = []
    kept = {k: v for k, v in metrics.items() if any(x == x for x in v)}
    by_stale = {
        name: [sum(v) / len(v) if v else float("nan") for v in lists]
        for name, lists in by_k.items()
        if any(lists)
    }
    return TrainResult(
        eval_steps=eval_steps, reward=reward, entropy=entropy, metrics=kept,
        metrics_by_staleness=by_stale, staleness=stal, behaviour_step=beh, grad_norm=gnorms,
        seconds=time.perf_counter() - start,
        params=[p.detach().clone() for p in theta] if keep_params else None,
    )


# ---------------------------------------------------------------------------------------------
# Gradient bias / variance against the exact gradient
# ---------------------------------------------------------------------------------------------


def mean_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """Mean over seeds, prompts and positions of KL(softmax(p) || softmax(q))."""
    lp, lq = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def perturb_to_kl(policy: Policy, params: Sequence[torch.Tensor], kl: float, gen: torch.Generator,
                  tol: float = 1e-3) -> list[torch.Tensor]:
    """params + eps * Z (Z ~ N(0, 1) per parameter) with eps set by bisection so that the mean
    per-position KL(pi_params || pi_new) equals ``kl``."""
    if kl <= 0:
        return [p.clone() for p in params]
    zs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    ref = policy.logits(params)

    def kl_at(eps: float) -> float:
        return mean_kl(ref, policy.logits([p + eps * z for p, z in zip(params, zs)]))

    lo, hi = 0.0, 1.0
    while kl_at(hi) < kl:
        hi *= 2
    mid = hi
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        val = kl_at(mid)
        if abs(val - kl) < tol * kl:
            break
        lo, hi = (mid, hi) if val < kl else (lo, mid)
    return [p + mid * z for p, z in zip(params, zs)]


@dataclass
class GradientStats:
    """How well one loss's mini-batch gradient estimates the exact grad J (parameter space).

    All quantities use g_b = -T * d loss_b / d params for mini-batch b (token-mean aggregation
    over B * T tokens, so on-policy REINFORCE with leave-one-out advantages has E[g_b] = grad J).
    With R mini-batches, mean g = (1/R) sum_b g_b and C = tr Cov(g_b):

    Attributes:
        cosine: cos(mean g, grad J) (noisy: shrinks towards 0 as C / R grows).
        cosine_debiased: <mean g, grad J> / (||grad J|| sqrt(||mean g||^2 - C / R)): the cosine of
            the expected gradient with the Monte-Carlo noise of the mean removed.
        rel_bias: ||mean g - grad J|| / ||grad J||.
        rel_bias_debiased: sqrt(max(0, ||mean g - grad J||^2 - C / R)) / ||grad J||, an
            (almost) unbiased estimate of ||E g - grad J|| / ||grad J||.
        noise_floor: sqrt(C / R) / ||grad J||, the standard error of ``rel_bias``.
        rel_var: C / ||grad J||^2, the variance of one mini-batch gradient.
        rel_mse: E||g_b - grad J||^2 / ||grad J||^2 (about rel_bias^2 + rel_var).
        scale: <mean g, grad J> / ||grad J||^2, the length of the step along the true gradient.
        n_batches: R.
        metrics: the loss's diagnostics averaged over the chunks of batches.
    """

    cosine: float
    cosine_debiased: float
    rel_bias: float
    rel_bias_debiased: float
    noise_floor: float
    rel_var: float
    rel_mse: float
    scale: float
    n_batches: int
    metrics: dict[str, float]


def logit_gradients(
    loss: str,
    logits: torch.Tensor,
    batches: Batch,
    task: Task,
    *,
    loss_params: dict[str, Any] | None = None,
    adv_mode: str = "rloo",
    is_source: str = "trainer",
) -> tuple[torch.Tensor, dict[str, float]]:
    """[R, P, T, V] per-mini-batch gradients -T dL_b/dlogits for a single task instance.

    ``batches`` holds R mini-batches stacked along the seed axis ([R, B, T]), all drawn from the
    same behaviour policy; ``logits`` [1, P, T, V] is the current policy. The loss is computed
    once on the pooled batch (its kernels act per token or per sequence, and token-mean over
    equal-length responses divides by a constant), and the gradient w.r.t. each token's
    log-prob is mapped to the logits with d log pi(y)/d logit_v = 1[y = v] - pi(v).
    """
    r, b, t = batches.tokens.shape
    p, v = logits.shape[1], logits.shape[-1]
    logp_all = torch.log_softmax(logits.detach(), -1).expand(r, p, t, v)  # [R, P, T, V]
    lp = _pick(logp_all, batches.prompt_ids, batches.tokens).clone().requires_grad_(True)
    adv = compute_advantages(batches.rewards, task.spec.group_size, adv_mode)
    out = loss_on_batch(loss, lp, batches, adv, is_source=is_source, loss_params=loss_params)
    (coef,) = torch.autograd.grad(out.loss, lp)  # [R, B, T] = d L_pooled / d log pi(y_bt)
    coef = -coef * (r * t)  # per-batch token-mean (x R), then the -T of g_b
    # sum_i coef_it * onehot(y_it), scattered into [R, P, T, V]
    pid = batches.prompt_ids.reshape(1, b, 1).expand(r, b, t)
    pos = torch.arange(t).reshape(1, 1, t).expand(r, b, t)
    rid = torch.arange(r).reshape(r, 1, 1).expand(r, b, t)
    flat = ((rid * p + pid) * t + pos) * v + batches.tokens
    g = torch.zeros(r * p * t * v, dtype=coef.dtype)
    g.scatter_add_(0, flat.reshape(-1), coef.reshape(-1))
    g = g.reshape(r, p, t, v)
    # minus (sum_i coef_it) * pi_t
    coef_sum = torch.zeros(r, p, t, dtype=coef.dtype)
    coef_sum.index_add_(1, batches.prompt_ids, coef)
    g = g - coef_sum.unsqueeze(-1) * logp_all[0].exp().unsqueeze(0)
    return g, out.metrics


def stack_batches(logits: torch.Tensor, task: Task, n: int, gen: torch.Generator,
                  mismatch: Mismatch = Mismatch()) -> Batch:
    """R = ``n`` independent mini-batches of a single instance, stacked on the seed axis."""
    big = logits.expand(n, *logits.shape[1:])
    task_r = Task(task.spec, task.key_pos, task.targets.expand(n, *task.targets.shape[1:]),
                  task.init_logits, task.seeds)
    return sample_batch(big, task_r, gen, mismatch)


class _Moments:
    """Running sums of flattened gradients, their squares and their squared error (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self.sq_err = 0.0
        self.metrics: dict[str, float] = {}
        self.chunks = 0

    def add(self, flat: torch.Tensor, true_grad: torch.Tensor, metrics: dict[str, float]) -> None:
        flat = flat.double()
        s1, s2 = flat.sum(0), (flat * flat).sum(0)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.sq_err += float(((flat - true_grad.reshape(1, -1)) ** 2).sum())
        self.n += flat.shape[0]
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v
        self.chunks += 1

    def stats(self, true_grad: torch.Tensor) -> GradientStats:
        if self.s1 is None or self.s2 is None or self.n < 2:
            raise ValueError("need at least two mini-batches")
        r = self.n
        tg = true_grad.reshape(-1).double()
        mean = self.s1 / r
        tr_cov = float(((self.s2 - r * mean * mean) / (r - 1)).sum())
        tn2 = float(tg @ tg)
        diff2 = float((mean - tg) @ (mean - tg))
        dot = float(mean @ tg)
        m2_deb = float(mean @ mean) - tr_cov / r
        return GradientStats(
            cosine=dot / (math.sqrt(float(mean @ mean) * tn2) + 1e-300),
            cosine_debiased=dot / math.sqrt(m2_deb * tn2) if m2_deb > 0 else float("nan"),
            rel_bias=math.sqrt(diff2 / tn2),
            rel_bias_debiased=math.sqrt(max(0.0, diff2 - tr_cov / r) / tn2),
            noise_floor=math.sqrt(tr_cov / r / tn2),
            rel_var=tr_cov / tn2,
            rel_mse=self.sq_err / r / tn2,
            scale=dot / tn2,
            n_batches=r,
            metrics={k: v / self.chunks for k, v in self.metrics.items()},
        )


@dataclass
class StudyResult:
    """Output of :func:`gradient_study`: per-loss stats plus the distance between pi and mu."""

    stats: dict[str, GradientStats]
    token_kl: float  # mean per-position KL(mu || pi)
    reward_mu: float  # J at the behaviour policy
    reward_pi: float  # J at the current policy
    num_params: int


def gradient_study(
    losses: dict[str, tuple[str, dict[str, Any]]],
    spec: TaskSpec,
    *,
    policy: PolicySpec = PolicySpec(),
    drift_steps: int = 0,
    drift_lr: float = 0.01,
    drift_kl: float | None = None,
    n_batches: int = 256,
    chunk: int = 128,
    seed: int = 0,
    mismatch: Mismatch = Mismatch(),
    is_source: str = "trainer",
    adv_mode: str = "rloo",
    dtype: torch.dtype = torch.float64,
) -> StudyResult:
    """Bias and variance of each loss's gradient at pi, with data drawn from mu.

    mu is the initial policy of one task instance (``seed``). pi is either mu after
    ``drift_steps`` on-policy Adam steps of REINFORCE at ``drift_lr`` (the weights a mini-batch
    that is ``drift_steps`` stale meets) or, with ``drift_kl``, mu's parameters plus Gaussian
    noise scaled to a mean per-position KL(mu || pi) of ``drift_kl``. The same R = ``n_batches``
    mini-batches from mu (drawn ``chunk`` at a time) feed every loss. ``losses`` maps a label to
    (registered loss name, parameters). Gradients are compared in parameter space: the logit
    gradients of each mini-batch are pulled back through the policy with a vector-Jacobian product.
    """
    task = make_task(spec, [seed], dtype=dtype)
    pol = Policy(policy, task, dtype=dtype)
    gen = torch.Generator().manual_seed(1_000_003 * seed + 7)
    mu_params = [p.clone() for p in pol.params]
    if drift_kl is not None:
        pi_params = perturb_to_kl(pol, mu_params, drift_kl, gen)
    elif drift_steps > 0:
        res = train("reinforce", task, n_stale=1, steps=drift_steps, lr=drift_lr, policy=policy,
                    eval_every=drift_steps, sample_seed=seed + 99, keep_params=True, init_params=mu_params)
        assert res.params is not None
        pi_params = res.params
    else:
        pi_params = [p.clone() for p in mu_params]
    mu_logits = pol.logits(mu_params).detach()
    pi_logits, vjp_fn = torch.func.vjp(lambda *ps: pol.logits(ps), *pi_params)
    pi_logits = pi_logits.detach()

    def pull_back(g_logits: torch.Tensor) -> torch.Tensor:
        """[R, P, T, V] logit gradients -> [R, n_params] parameter gradients."""
        parts = torch.func.vmap(vjp_fn)(g_logits.unsqueeze(1))
        return torch.cat([x.reshape(x.shape[0], -1) for x in parts], 1)

    true_grad = pull_back(exact_gradient(pi_logits, task))[0]
    acc = {label: _Moments() for label in losses}
    done = 0
    while done < n_batches:
        n = min(chunk, n_batches - done)
        batches = stack_batches(mu_logits, task, n, gen, mismatch)
        for label, (name, params) in losses.items():
            g, metrics = logit_gradients(name, pi_logits, batches, task, loss_params=params,
                                         adv_mode=adv_mode, is_source=is_source)
            acc[label].add(pull_back(g), true_grad, metrics)
        done += n
    with torch.no_grad():
        return StudyResult(
            stats={label: m.stats(true_grad) for label, m in acc.items()},
            token_kl=mean_kl(mu_logits, pi_logits),
            reward_mu=float(expected_reward(mu_logits, task)[0]),
            reward_pi=float(expected_reward(pi_logits, task)[0]),
            num_params=pol.num_params(),
        )

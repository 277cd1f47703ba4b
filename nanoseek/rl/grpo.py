"""GRPO and its variants as pure tensor functions (spec §7; DeepSeekMath §4.1, R1 §2.2.1).

One group = the G completions of one prompt. Shapes: B completions (= prompts × G), T completion
tokens (right-padded), `mask` [B, T] 1 on real completion tokens; log-probs [B, T] of the sampled
tokens under the current policy (`logp`, with grad), the policy that sampled them (`old_logp`)
and the frozen reference (`ref_logp`).

Advantages (outcome supervision: every token of o_i gets A_i):
  `group_advantages`     (r − mean_g) / (std_g + ε), std Bessel-corrected (TRL's choice; the
                         papers do not say which: spec §7.2 *unverified*), ε = 1e-4; a group of
                         equal rewards gives 0 — no signal, and no division by ~0.
  `dr_grpo_advantages`   r − mean_g (Dr. GRPO: the std favours too easy and too hard questions).

Per-token objective (DeepSeekMath eq. 3; R1 eqs. 1–3):
  l_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β·k3_t,   ρ_t = exp(logp − old_logp)
  k3_t = exp(ref − logp) − (ref − logp) − 1 ≥ 0   (Schulman's estimator of KL(π_θ‖π_ref); added to
  the loss, not to the reward)
The variants differ in how the token losses are averaged — each is its own function, not a
string switch (STYLE 4):
  `grpo_loss`      mean over sequences of the mean over each sequence's tokens (DeepSeekMath)
  `dr_grpo_loss`   Σ_tokens l / (sequences × max_len): no length normalisation (Dr. GRPO)
  `dapo_loss`      Σ_tokens l / Σ tokens (token-level), clip-higher ε_high = 0.28, no KL (DAPO)
and DAPO's batch filters are their own functions too: `informative_groups` (dynamic sampling:
drop groups whose rewards are all equal) and `overlong_mask` (overlong filtering: truncated
completions get no loss).

Exact sums under gradient accumulation and data parallelism. Every loss takes the global
denominator (`num_seqs`, `num_tokens`) of the whole optimizer step; a micro-batch's loss is then
its share of the step's loss, so summing micro-batches (and DDP's average × world size) gives the
gradient of the whole batch at once — as train/step.py does for cross-entropy.

With μ = 1 (one update per rollout, old = current): ρ = 1, clipping never binds, and ∇ of the
surrogate is REINFORCE with the group baseline: −A ∇logp (tests/rl/test_grpo.py checks it).
"""
from __future__ import annotations

import torch


# ------------------------------------------------------------------ advantages
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """[P·G] rewards (groups contiguous) -> (r − mean_g) / (std_g + eps), std with Bessel's correction.

    >>> [round(a, 4) for a in group_advantages(torch.tensor([1., 0., 0., 1., 2., 2.]), 2).tolist()]
    [0.707, -0.707, -0.707, 0.707, 0.0, 0.0]
    """
    r = rewards.float().view(-1, group_size)
    std = r.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).flatten()


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P·G] -> r − mean_g (Dr. GRPO: no division by the group's std).

    >>> dr_grpo_advantages(torch.tensor([1., 0., 0., 0.]), 4).tolist()
    [0.75, -0.25, -0.25, -0.25]
    """
    r = rewards.float().view(-1, group_size)
    return (r - r.mean(dim=1, keepdim=True)).flatten()


# ------------------------------------------------------------------ per-token terms
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ‖π_ref) per sampled token: e^(ref−lp) − (ref−lp) − 1 ≥ 0.

    >>> k3(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0])).tolist()
    [0.0, 0.7182817459106445]
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) [B, T], bool [B, T] where the clipped term was taken).
    `adv` is [B] (one advantage per completion) or [B, T]."""
    a = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def token_losses(logp, old_logp, adv, eps_low: float, eps_high: float, beta: float = 0.0,
                 ref_logp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss l [B, T] = surrogate + β·k3, and the clipped-token indicator."""
    loss, clipped = clipped_surrogate(logp, old_logp, adv, eps_low, eps_high)
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        loss = loss + beta * k3(logp, ref_logp)
    return loss, clipped


# ------------------------------------------------------------------ the three objectives
def grpo_loss(logp, old_logp, adv, mask, eps: float = 0.2, beta: float = 0.0, ref_logp=None,
              num_seqs: float | None = None) -> torch.Tensor:
    """GRPO (DeepSeekMath eq. 3): (1/N) Σ_i (1/|o_i|) Σ_t l_{i,t}; N = `num_seqs` (global) or B."""
    m = mask.float()
    loss, _ = token_losses(logp, old_logp, adv, eps, eps, beta, ref_logp)
    per_seq = (loss * m).sum(1) / m.sum(1).clamp(min=1)
    return per_seq.sum() / (num_seqs if num_seqs is not None else mask.shape[0])


def dr_grpo_loss(logp, old_logp, adv, mask, max_len: int, eps: float = 0.2, beta: float = 0.0, ref_logp=None,
                 num_seqs: float | None = None) -> torch.Tensor:
    """Dr. GRPO: Σ_{i,t} l_{i,t} / (N · max_len) — a constant denominator, no length bias."""
    loss, _ = token_losses(logp, old_logp, adv, eps, eps, beta, ref_logp)
    n = num_seqs if num_seqs is not None else mask.shape[0]
    return (loss * mask.float()).sum() / (n * max_len)


def dapo_loss(logp, old_logp, adv, mask, eps_low: float = 0.2, eps_high: float = 0.28,
              num_tokens: float | None = None) -> torch.Tensor:
    """DAPO: Σ_{i,t} l_{i,t} / Σ tokens (token-level), clip-higher, no KL term."""
    m = mask.float()
    loss, _ = clipped_surrogate(logp, old_logp, adv, eps_low, eps_high)
    return (loss * m).sum() / (num_tokens if num_tokens is not None else m.sum().clamp(min=1))




# ------------------------------------------------------------------ DAPO's batch filters
def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dynamic sampling: [P] bool, True for groups whose rewards are not all equal (the others
    carry no advantage under group normalisation).

    >>> informative_groups(torch.tensor([1., 1., 0., 1., 0., 0.]), 2).tolist()
    [False, True, False]
    """
    r = rewards.view(-1, group_size)
    return (r != r[:, :1]).any(dim=1)


def overlong_mask(finish_reasons: list[str | None]) -> torch.Tensor:
    """Overlong filtering: [B] 1.0 for completions that ended (EOS / stop), 0.0 for truncated ones.

    >>> overlong_mask(["stop", "length", "stop"]).tolist()
    [1.0, 0.0, 1.0]
    """
    return torch.tensor([0.0 if r == "length" else 1.0 for r in finish_reasons])


# ------------------------------------------------------------------ what gets logged
@torch.no_grad()
def token_stats(logp, old_logp, mask, eps_low: float, eps_high: float, adv, ref_logp=None) -> dict:
    """Sums over real tokens (for global averaging): tokens, clipped tokens, and k3 when a
    reference is given."""
    m = mask.float()
    _, clipped = clipped_surrogate(logp, old_logp, adv, eps_low, eps_high)
    out = {"tokens": m.sum(), "clipped": (clipped.float() * m).sum()}
    if ref_logp is not None:
        out["k3"] = (k3(logp, ref_logp) * m).sum()
    return out

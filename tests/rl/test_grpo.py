"""GRPO's pure functions against hand-computed toy batches and their defining identities."""
from __future__ import annotations

import math

import torch

from nanoseek.rl import grpo

# a toy batch: 2 completions, 3 token slots, the second completion has 2 real tokens
LOGP = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.5, -9.0]])
OLD = torch.tensor([[-1.2, -0.5, -1.0], [-0.2, -1.0, -9.0]])
REF = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, -1.0])


def _token_loss(lp, old, a, eps_lo, eps_hi, beta=0.0, ref=None):
    r = math.exp(lp - old)
    val = -min(r * a, min(max(r, 1 - eps_lo), 1 + eps_hi) * a)
    if beta:
        val += beta * (math.exp(ref - lp) - (ref - lp) - 1)
    return val


def _hand(eps_lo=0.2, eps_hi=0.2, beta=0.0):
    return [[_token_loss(LOGP[i, t].item(), OLD[i, t].item(), ADV[i].item(), eps_lo, eps_hi, beta, REF[i, t].item())
             for t in range(3)] for i in range(2)]


def test_group_advantages_closed_form_and_equal_rewards_give_zero():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    a = grpo.group_advantages(r, 4)
    std = torch.tensor([1.0, 0, 0, 0]).std(unbiased=True)
    assert torch.allclose(a[:4], (torch.tensor([1.0, 0, 0, 0]) - 0.25) / (std + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))
    assert torch.allclose(grpo.dr_grpo_advantages(r, 4)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert torch.equal(grpo.dr_grpo_advantages(r, 4)[4:], torch.zeros(4))


def test_grpo_loss_is_the_mean_over_sequences_of_token_means():
    h = _hand(beta=0.04)
    want = (sum(h[0]) / 3 + sum(h[1][:2]) / 2) / 2
    got = grpo.grpo_loss(LOGP, OLD, ADV, MASK, eps=0.2, beta=0.04, ref_logp=REF)
    assert abs(float(got) - want) < 1e-6
    # a global denominator (more sequences elsewhere) scales the share
    assert abs(float(grpo.grpo_loss(LOGP, OLD, ADV, MASK, 0.2, 0.04, REF, num_seqs=8)) - want * 2 / 8) < 1e-6


def test_dr_grpo_loss_has_a_constant_denominator():
    h = _hand()
    want = (sum(h[0]) + sum(h[1][:2])) / (2 * 10)
    assert abs(float(grpo.dr_grpo_loss(LOGP, OLD, ADV, MASK, max_len=10)) - want) < 1e-6


def test_dapo_loss_is_token_level_with_clip_higher_and_no_kl():
    h = _hand(0.2, 0.28)
    want = (sum(h[0]) + sum(h[1][:2])) / 5
    assert abs(float(grpo.dapo_loss(LOGP, OLD, ADV, MASK, 0.2, 0.28)) - want) < 1e-6
    # clip-higher: a positive-advantage token at ρ = 1.25 is clipped at 1.2 but not at 1.28
    lp, old = torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1)
    one = torch.ones(1, 1, dtype=torch.bool)
    assert abs(float(grpo.grpo_loss(lp, old, torch.ones(1), one, eps=0.2)) + 1.2) < 1e-6
    assert abs(float(grpo.dapo_loss(lp, old, torch.ones(1), one, 0.2, 0.28)) + 1.25) < 1e-6


def test_mu_one_is_reinforce_with_the_group_baseline_plus_kl_gradient():
    """old = current (detached): ρ = 1, nothing clipped, ∇loss = −(1/N) Σ_i A_i/|o_i| Σ_t ∇logp + β ∇k3."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=g, requires_grad=True)
    ids = torch.randint(0, 7, (4, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    ref = torch.randn(4, 5, generator=g).clamp(max=-0.1)
    beta = 0.1

    def logp():
        return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)

    lp = logp()
    _, clipped = grpo.clipped_surrogate(lp, lp.detach(), adv, 0.2, 0.2)
    assert not clipped.any() and torch.allclose(torch.exp(lp - lp.detach()), torch.ones(4, 5))
    grpo.grpo_loss(lp, lp.detach(), adv, mask, 0.2, beta, ref).backward()
    ours = logits.grad.clone()
    logits.grad = None
    lp, m = logp(), mask.float()
    reinforce = -(adv[:, None] * lp * m).sum(1) / m.sum(1)
    kl = (grpo.k3(lp, ref) * m).sum(1) / m.sum(1)
    (reinforce + beta * kl).mean().backward()
    assert torch.allclose(ours, logits.grad, atol=1e-6)


def test_k3_is_nonnegative_and_zero_only_at_equality():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(10000, generator=g) * 3, torch.randn(10000, generator=g) * 3
    assert (grpo.k3(a, b) >= 0).all() and torch.equal(grpo.k3(a, a), torch.zeros(10000))


def test_dapo_filters():
    assert grpo.informative_groups(torch.tensor([1.0, 1.0, 1.0, 0.0]), 2).tolist() == [False, True]
    assert grpo.overlong_mask(["length", "stop", None]).tolist() == [0.0, 1.0, 1.0]


def test_token_stats_count_clips_and_kl_over_real_tokens():
    st = grpo.token_stats(LOGP, OLD, MASK, 0.2, 0.2, ADV, REF)
    assert st["tokens"] == 5
    ratio = torch.exp(LOGP - OLD)
    a = ADV[:, None].expand(2, 3)
    clipped = ((ratio.clamp(0.8, 1.2) * a < ratio * a) & MASK).sum()
    assert st["clipped"] == clipped and st["k3"] >= 0

"""AdamW with weight-decay groups, and the learning-rate schedules (V3 §4.2, deepseek_spec §6.2).

Param groups (`param_groups`): matrices decay (embedding, head, attention, experts, router gate,
MTP projection); vectors do not (norm scales, biases). The router's `e_score_correction_bias` is a
buffer moved by the balancing sign step (train/step.py), never by the optimizer. V3: AdamW β = (0.9,
0.95), weight decay 0.1, clip 1.0 — the defaults of the stages.

Moments: fp32 by default (torch's AdamW, foreach). V3 kept the AdamW moments in BF16 with fp32
master weights (§3.3.3); `AdamW(..., moment_dtype=torch.bfloat16)` is that option — the update is
computed in fp32 from moments stored in bf16. With fp32 moments it matches torch.optim.AdamW to
fp32 rounding (tests/train/test_train.py).

Schedules are pure functions of the step (so a resumed run recomputes the same LR):
  cosine_lr  linear warmup to max_lr, then cosine to min_lr at `total` (V3's decay shape)
  wsd_lr     warmup-stable-decay: warmup, constant max_lr, then a linear decay to min_lr over the
             last `decay_frac` of the steps — V3's own schedule is constant-then-cosine-decay, and
             WSD lets a run be extended from its stable phase
"""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ≥2-D tensors with `weight_decay`, 1-D tensors (norms, biases) without.

    Tied tensors appear once (named_parameters de-duplicates).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam with moments stored in `moment_dtype` (V3: bf16), math in fp32."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, moment_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        return loss


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                    moments: str = "fp32") -> torch.optim.Optimizer:
    """AdamW over `param_groups`; moments "fp32" (torch AdamW) or "bf16" (V3, our AdamW)."""
    groups = param_groups(model, weight_decay)
    if moments == "fp32":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay)
    if moments == "bf16":
        return AdamW(groups, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay,
                     moment_dtype=torch.bfloat16)
    raise ValueError(f"moments must be fp32 or bf16, not {moments!r}")


# ------------------------------------------------------------------ schedules
def cosine_lr(step: int, max_lr: float, warmup: int, total: int, min_lr: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from max_lr to min_lr at step `total`.

    >>> [round(cosine_lr(s, 1.0, 2, 6, 0.1), 3) for s in range(7)]
    [0.5, 1.0, 1.0, 0.868, 0.55, 0.232, 0.1]
    """
    if step < warmup:
        return max_lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


def wsd_lr(step: int, max_lr: float, warmup: int, total: int, min_lr: float, decay_frac: float = 0.2) -> float:
    """Warmup, stable at max_lr, then linear decay to min_lr over the last `decay_frac` of `total`.

    >>> [round(wsd_lr(s, 1.0, 2, 10, 0.0, 0.4), 2) for s in range(11)]
    [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if step < warmup:
        return max_lr * (step + 1) / warmup
    decay_start = total - int(decay_frac * total)
    if step < decay_start:
        return max_lr
    frac = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return max_lr + (min_lr - max_lr) * frac


def constant_lr(step: int, max_lr: float, warmup: int) -> float:
    """Linear warmup, then max_lr (RL stages: R1's GRPO used a constant 3e-6).

    >>> [constant_lr(s, 1.0, 2) for s in range(4)]
    [0.5, 1.0, 1.0, 1.0]
    """
    return max_lr * (step + 1) / warmup if step < warmup else max_lr


SCHEDULES = {"cosine": cosine_lr, "wsd": wsd_lr, "constant": constant_lr}


def lr_at(step: int, schedule: str, max_lr: float, warmup: int, total: int, min_lr: float,
          decay_frac: float = 0.2) -> float:
    if schedule == "wsd":
        return wsd_lr(step, max_lr, warmup, total, min_lr, decay_frac)
    if schedule == "cosine":
        return cosine_lr(step, max_lr, warmup, total, min_lr)
    if schedule == "constant":
        return constant_lr(step, max_lr, warmup)
    raise ValueError(f"unknown schedule {schedule!r}; choose {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr

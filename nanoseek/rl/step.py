"""One GRPO step on the shared training loop: rollout → rewards → advantages → μ policy updates.

    stage = grpo_stage(cfg, gcfg, policy, optimizer, llm, ref, problem_at, dist)
    loop.run(cfg, stage, policy, optimizer, tokenizer, dist, steps)     # train/loop.py

A step takes `prompts_per_step` problems (this rank's contiguous share of them, like the rows of
pretraining), samples G completions of each through the engine on the live policy (rollout.py;
the engine holds the same module, so no weights are copied; its prefix cache is cleared after
every update, because the cached KV was computed by the old weights), scores them, and turns the
rewards into advantages per group. Then μ updates, each one optimizer step over all the step's
completions in micro-batches of `micro_batch` rows (gradient accumulation), clipped like any
step. π_old is the policy that sampled: with μ = 1 its log-probs are the current ones detached
(ρ = 1; TRL does the same), with μ > 1 one no-grad pass computes them before the first update.
π_ref is the initial policy, frozen (β = 0 skips it and its forward pass).

The objective is chosen once, by name, from rl/grpo.py's functions (`OBJECTIVES`): GRPO (group
advantages, per-sequence mean), Dr. GRPO (r − mean, constant denominator), DAPO (token-level,
clip-higher, no KL, plus dynamic sampling — uninformative groups are dropped from the loss,
not resampled — and overlong filtering). Every denominator is global (all micro-batches, all
ranks; one all-reduce), so N ranks compute the gradient of one process on the same prompts
(tests/rl/test_grpo_run.py).

The router bias is not moved during RL (no balancing step: RL batches are small and
on-policy; the pretrained bias is kept) and MTP modules are not trained.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanoseek.rl import grpo, rollout
from nanoseek.rl.plots import plot_grpo
from nanoseek.tasks import Problem
from nanoseek.train import distributed
from nanoseek.train.config import TrainConfig
from nanoseek.train.loop import Stage


@dataclass
class GRPOConfig:
    group_size: int = field(default=8, metadata={"help": "G: completions per prompt (R1: 16)"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per step, over all ranks (R1: 32)"})
    mu: int = field(default=1, metadata={"help": "μ: policy updates per rollout batch"})
    objective: str = field(default="grpo", metadata={"help": "loss: grpo | dr_grpo | dapo (rl/grpo.py)",
                                                     "choices": ["grpo", "dr_grpo", "dapo"]})
    eps: float = field(default=0.2, metadata={"help": "clip ε (R1 stage 1 used 10)"})
    eps_high: float = field(default=0.28, metadata={"help": "DAPO's clip-higher ε_high"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient β to the frozen initial policy (R1: "
                                                       "0.001; 0 skips the reference model)"})
    temperature: float = field(default=1.0, metadata={"help": "rollout temperature (R1: 1.0)"})
    top_p: float = field(default=1.0, metadata={"help": "rollout nucleus mass"})
    max_tokens: int = field(default=160, metadata={"help": "completion length limit in tokens"})
    template: str = field(default="r1zero", metadata={"help": "prompt template", "choices": ["r1zero", "chat"]})
    accuracy_weight: float = field(default=1.0, metadata={"help": "weight of the accuracy reward"})
    format_weight: float = field(default=1.0, metadata={"help": "weight of the format reward (R1-Zero: 1)"})
    language_weight: float = field(default=0.0, metadata={"help": "weight of the language-consistency reward"})

    def weights(self) -> dict[str, float]:
        return {"accuracy": self.accuracy_weight, "format": self.format_weight, "language": self.language_weight}


def objective(gcfg: GRPOConfig, max_len: int) -> Callable:
    """(logp, old, adv, mask, ref, num_seqs, num_tokens) -> loss, for the configured variant."""
    if gcfg.objective == "grpo":
        return lambda lp, old, adv, m, ref, ns, nt: grpo.grpo_loss(lp, old, adv, m, gcfg.eps, gcfg.beta, ref, ns)
    if gcfg.objective == "dr_grpo":
        return lambda lp, old, adv, m, ref, ns, nt: grpo.dr_grpo_loss(lp, old, adv, m, max_len, gcfg.eps, gcfg.beta,
                                                                      ref, ns)
    if gcfg.objective == "dapo":
        return lambda lp, old, adv, m, ref, ns, nt: grpo.dapo_loss(lp, old, adv, m, gcfg.eps, gcfg.eps_high, nt)
    raise ValueError(f"unknown objective {gcfg.objective!r}")


def advantages(gcfg: GRPOConfig, rewards: torch.Tensor) -> torch.Tensor:
    if gcfg.objective == "dr_grpo":
        return grpo.dr_grpo_advantages(rewards, gcfg.group_size)
    return grpo.group_advantages(rewards, gcfg.group_size)


def token_logprobs(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each next token [B, L−1], logits [B, L−1, V]) under `model`."""
    logits = model(ids, mtp=False).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp, logits


@torch.no_grad()
def logprobs_no_grad(model, ids: torch.Tensor, micro: int) -> torch.Tensor:
    return torch.cat([token_logprobs(model, ids[i: i + micro])[0] for i in range(0, len(ids), micro)])


def clip_range(gcfg: GRPOConfig) -> tuple[float, float]:
    """(ε_low, ε_high): symmetric, or DAPO's clip-higher."""
    return gcfg.eps, gcfg.eps_high if gcfg.objective == "dapo" else gcfg.eps


def update(policy, optimizer, ids, mask, adv, old, ref, loss_fn, clip: tuple[float, float], cfg: TrainConfig, dist,
           micro: int, num_seqs: float, num_tokens: float) -> dict:
    """One optimizer step over all rows (micro-batches accumulate); returns summed statistics."""
    sums: dict[str, float] = {}
    chunks = list(range(0, len(ids), micro))
    for j, i in enumerate(chunks):
        sl = slice(i, i + micro)
        with distributed.grad_sync(policy, j == len(chunks) - 1):
            logp, logits = token_logprobs(policy, ids[sl])
            old_mb = logp.detach() if old is None else old[sl]
            ref_mb = None if ref is None else ref[sl]
            loss = loss_fn(logp, old_mb, adv[sl], mask[sl], ref_mb, num_seqs, num_tokens)
            (loss * dist.world).backward()
        with torch.no_grad():
            st = grpo.token_stats(logp, old_mb, mask[sl], clip[0], clip[1], adv[sl], ref_mb)
            p = torch.softmax(logits, -1)
            st["entropy"] = (-(p * torch.log(p.clamp(min=1e-30))).sum(-1) * mask[sl]).sum()
            st["loss"] = loss.detach()      # micro-batch shares of the step's loss: they sum to it
        for k, v in st.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sums["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    return sums


def grpo_stage(cfg: TrainConfig, gcfg: GRPOConfig, policy, optimizer, llm, ref, problem_at: Callable[[int], Problem],
               dist, evaluate: Callable[[int], dict]) -> Stage:
    """The loop's Stage for GRPO. `problem_at(g)` is the g-th prompt of the run's order (epochs
    and shuffling are its business); `evaluate(step)` the held-out evaluation."""
    if gcfg.prompts_per_step % dist.world:
        raise ValueError(f"prompts per step {gcfg.prompts_per_step} must divide among {dist.world} ranks")
    per_rank = gcfg.prompts_per_step // dist.world
    micro = cfg.micro_batch or 32
    plain = distributed.unwrap(policy)
    pad = getattr(llm.tokenizer, "pad_id", None) or 0
    loss_fn, clip = objective(gcfg, gcfg.max_tokens), clip_range(gcfg)

    def step(step: int, position: int) -> tuple[dict, int]:
        first = position + dist.rank * per_rank
        problems = [problem_at(first + k) for k in range(per_rank)]
        plain.eval()
        roll = rollout.generate(llm, problems, gcfg.group_size, gcfg.template, gcfg.temperature, gcfg.top_p,
                                gcfg.max_tokens, cfg.seed, step, first)
        plain.train()
        rollout.score(roll, gcfg.weights(), gcfg.template)
        adv = advantages(gcfg, roll.rewards["total"])
        ids, mask = rollout.training_rows(roll, pad)
        keep = torch.ones(len(ids))
        if gcfg.objective == "dapo":
            keep = grpo.informative_groups(roll.rewards["total"], gcfg.group_size).float().repeat_interleave(
                gcfg.group_size) * grpo.overlong_mask(roll.finish_reasons)
        mask = mask & keep.bool()[:, None]
        local = torch.tensor([float(keep.sum()), float(mask.sum()), float(len(ids)), float(sum(roll.lengths)),
                              roll.seconds])
        num_seqs, num_tokens, _, gen_tokens, gen_s = dist.all_reduce_sum(local).tolist()
        num_seqs, num_tokens = max(num_seqs, 1.0), max(num_tokens, 1.0)
        old = logprobs_no_grad(plain, ids, micro) if gcfg.mu > 1 else None
        ref_lp = logprobs_no_grad(ref, ids, micro) if gcfg.beta and ref is not None else None
        t0 = time.perf_counter()
        for _ in range(gcfg.mu):        # the last update's statistics are logged (with μ > 1, ρ ≠ 1 there)
            sums = update(policy, optimizer, ids, mask, adv, old, ref_lp, loss_fn, clip, cfg, dist, micro, num_seqs,
                          num_tokens)
        llm.update_weights()                                      # its prefix KV and packs came from the old weights
        train_s = time.perf_counter() - t0
        return record(roll, sums, gen_tokens, gen_s / dist.world, train_s, dist), gcfg.prompts_per_step

    return Stage("grpo", step=step, evaluate=evaluate, progress_keys=("reward", "accuracy", "response_len_mean"),
                 summary_keys=["reward", "accuracy", "response_len_mean", "self_check_share"], plot=plot_grpo)


def record(roll: rollout.Rollout, sums: dict, gen_tokens: float, gen_s: float, train_s: float, dist) -> dict:
    """The step's metrics, averaged over all ranks (one all-reduce of sums). `gen_tokens` (all
    ranks) and `gen_s` (mean rollout seconds) are already global."""
    n = float(len(roll.texts))
    keys = sorted(roll.rewards)
    beh = rollout.behaviour(roll)
    stat_keys = ["tokens", "clipped", "entropy", "loss"] + (["k3"] if "k3" in sums else [])
    vec = torch.tensor([n, train_s] + [float(roll.rewards[k].sum()) for k in keys] + [beh[k] * n for k in sorted(beh)]
                       + [sums[k] for k in stat_keys])
    tot = dist.all_reduce_sum(vec).tolist()
    N, T = tot[0], max(tot[2 + len(keys) + len(beh) + 0], 1.0)
    it = iter(tot[2:])
    rec = {("reward" if k == "total" else k): next(it) / N for k in keys}
    rec.update({k: next(it) / N for k in sorted(beh)})
    st = {k: next(it) for k in stat_keys}
    rec.update({"clip_frac": st["clipped"] / T, "entropy": st["entropy"] / T, "loss": st["loss"],
                "grad_norm": sums["grad_norm"], "tokens": int(st["tokens"]),
                "rollout_tokens_per_s": gen_tokens / max(gen_s, 1e-9),
                "train_tokens_per_s": st["tokens"] / max(tot[1] / dist.world, 1e-9)})
    if "k3" in st:
        rec["kl"] = st["k3"] / T
    rec["response_len_median"] = beh["response_len_median"]       # a median does not average: rank 0's
    return rec

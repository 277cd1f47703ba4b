"""Rollouts: prompts → G completions each through the engine on the live policy → rewards → the
padded tensors a GRPO update trains on.

Prompts (`prompt_text`): "r1zero" is the paper's R1-Zero template (spec §8.1, tokenizer.r1_zero_prompt:
the completion starts after "Assistant:" and writes " <think>…</think> <answer>…</answer>"); "chat"
is the R1 chat template with its generation prompt, which already opens "<think>\\n" (the format
reward is then told so). The engine adds BOS, as the packer did for every pretraining document.

The G samples of a prompt are one request with n = G: they share its prefill and its full prompt
blocks (reference counts, engine/llm.py), so a group costs one prompt's prefill. Each request has
its own seed, derived from (run seed, step, the prompt's global index): the same completions for
any batch composition and any number of ranks, and on a resumed run.

Rewards (`score`): each component of rl/rewards.py separately (logged per component) and their
weighted sum (what advantages use). Also what the R1 paper watches: the share of completions that
check themselves (`SELF_CHECK`, one list below) and of language-mixed reasoning.
"""
from __future__ import annotations

import hashlib
import re
import statistics
import time
from dataclasses import dataclass, field
from functools import partial

import torch

from nanoseek.engine import SamplingParams
from nanoseek.eval.metrics import step_accuracy
from nanoseek.rl import rewards as R
from nanoseek.tasks import Problem
from nanoseek.tokenizer import r1_zero_prompt

# Phrases that mark a response checking itself (R1's "aha": "Wait, wait. … let's reevaluate"),
# matched case-insensitively anywhere in the reasoning; the corpus's own check style
# (tasks.base.REFLECT_MARKERS: "Wait, let me check" / "等等，让我检查一下") is covered by them.
SELF_CHECK = ("wait", "let me check", "check:", "let me verify", "double-check", "double check", "re-check", "recheck",
              "reevaluate", "re-evaluate", "检查", "验算", "验证", "等等")
_SELF_CHECK = re.compile("|".join(re.escape(m) for m in SELF_CHECK), re.IGNORECASE)


def prompt_text(problem: Problem, template: str, tokenizer=None) -> str:
    if template == "r1zero":
        return r1_zero_prompt(problem.prompt)
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}],
                                             add_generation_prompt=True, tokenize=False)
    raise ValueError(f"template must be r1zero or chat, not {template!r}")


def request_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed per (run, step, global prompt index)."""
    h = hashlib.sha256(f"{seed}/{step}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


@dataclass
class Rollout:
    """B = prompts × G completions, groups contiguous."""
    problems: list[Problem]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str | None]
    group_size: int
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)   # component -> [B]; "total" too
    seconds: float = 0.0

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]


def generate(llm, problems: list[Problem], group_size: int, template: str, temperature: float, top_p: float,
             max_tokens: int, seed: int, step: int, first_index: int) -> Rollout:
    """G completions for each problem (problem k has global index first_index + k)."""
    prompts = [prompt_text(p, template, llm.tokenizer) for p in problems]
    params = [SamplingParams(n=group_size, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                             seed=request_seed(seed, step, first_index + k)) for k in range(len(problems))]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    prompt_ids = [llm.encode(p) for p in prompts]
    roll = Rollout([], [], [], [], [], group_size, seconds=seconds)
    for problem, ids, completions in zip(problems, prompt_ids, outs):
        for c in completions:
            roll.problems.append(problem)
            roll.prompt_ids.append(ids)
            roll.completion_ids.append(list(c.token_ids))
            roll.texts.append(c.text)
            roll.finish_reasons.append(c.finish_reason)
    return roll


def score(roll: Rollout, weights: dict[str, float], template: str) -> None:
    """Fill roll.rewards: every component with a weight (accuracy, format, language), and "total"."""
    fmt = partial(R.format, think_in_prompt=template == "chat")
    components = {"accuracy": R.accuracy, "format": fmt, "language": R.language_consistency}
    total = torch.zeros(len(roll.texts))
    for name, fn in components.items():
        w = weights.get(name, 0.0)
        if w or name in ("accuracy", "format"):          # always measured, counted by their weight
            roll.rewards[name] = torch.tensor(fn(roll.texts, roll.problems), dtype=torch.float32)
            total += w * roll.rewards[name]
    roll.rewards["total"] = total


def behaviour(roll: Rollout) -> dict:
    """What R1 watches in the responses: length, self-checking, language mixing, truncation."""
    lengths = roll.lengths
    reasoning = [R.reasoning_text(t) for t in roll.texts]
    mixed = R.language_consistency(roll.texts, roll.problems)
    right, written = step_accuracy(roll.texts)
    n = max(1, len(lengths))
    return {"response_len_mean": sum(lengths) / n, "response_len_median": statistics.median(lengths) if lengths else 0,
            "self_check_share": sum(bool(_SELF_CHECK.search(r)) for r in reasoning) / n,
            "language_mixed_share": sum(m < 1.0 for m in mixed) / n,
            "truncated_share": sum(r == "length" for r in roll.finish_reasons) / n,
            "step_accuracy": right / written if written else 0.0}


def training_rows(roll: Rollout, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L] prompt + completion, right-padded; completion mask [B, L − 1] aligned with the
    next-token log-probs: position t scores token t + 1)."""
    rows = [p + c for p, c in zip(roll.prompt_ids, roll.completion_ids)]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L - 1, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(roll.prompt_ids, roll.completion_ids)):
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        mask[b, len(p) - 1: len(p) - 1 + len(c)] = True
    return ids, mask

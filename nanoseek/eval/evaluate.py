"""`evaluate(llm, problems, cfg)`: R1's evaluation protocol through our engine (spec §11, §8.3).

What. Every problem gets k samples in ONE `llm.generate` call (`SamplingParams(n=k)`: the k
samples share the prompt's prefill and KV blocks), at R1's T = 0.6, top-p 0.95. Each completion's
answer is extracted with `rl.rewards.extract_answer` and scored by the problem's own checker
(`tasks.score_many`): the very calls of the RL accuracy reward, so a model's reward during GRPO
and its score here cannot disagree. From those k scores per problem come pass@1 (R1's mean over
samples), unbiased pass@j for j = 1, 2, 4, … ≤ k, and cons@k (majority vote), see metrics.py.
`temperature=0` (greedy) runs but is not the protocol: R1 rejects greedy evaluation (repetition,
checkpoint variance), and its k samples would all be one, so pass@k = cons@k = pass@1.

Prompts (`template`):
    "r1zero"  the tokenizer-free R1-Zero text `r1_zero_prompt(question)` (spec §8.1), ending in
              "Assistant:"; the engine prepends BOS, as the pretraining packer did. The completion
              is " <think>…</think>\\n<answer>…</answer>".
    "chat"    the R1 chat template with the generation prompt "<｜Assistant｜><think>\\n" (spec
              §12), so the completion starts inside the think block; no system prompt (R1's
              usage notes). extract_answer reads both shapes.
No stop strings: the engine cuts a stop string out of the text, and "</answer>" is part of what
extract_answer looks for; completions end at EOS or `max_tokens`.

Seeds. Problem p's k samples use seed `problem_seed(cfg.seed, p)`, a hash of the run seed and
the problem's *prompt text*, not of its position in the list: results then do not depend on what
else shares the batch, on the order of the problems or on taking a subset (the engine draws each
request from its own seeded generators). The brief asked for "seed and problem index"; the
index was rejected because filtering a problem list (`--task linear --data eval.jsonl`) would
renumber the problems and change their samples. Two identical prompts therefore get identical
samples; load_problems drops duplicates.

Output. A small JSON-able dict (the metrics, lengths, the share of responses with an extractable
answer, the share cut by `max_tokens`, the settings) and, with `with_records=True`, per-problem
records (prompt, reference answer, every completion's text, extracted answer, score and length).
"""
from __future__ import annotations

import hashlib
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from nanoseek.eval.metrics import cons_at_k, majority_vote, mean_pass_at_k, pass_at_1, pass_k_ladder, step_accuracy
from nanoseek.rl.rewards import extract_answer
from nanoseek.tasks import Problem, score_many
from nanoseek.tokenizer import r1_zero_prompt

if TYPE_CHECKING:
    from nanoseek.engine import Completion

__all__ = ["EvalConfig", "TEMPLATES", "evaluate", "problem_seed", "prompts_for", "sample", "score",
           "summarize"]

TEMPLATES = ("r1zero", "chat")


@dataclass
class EvalConfig:
    """R1's evaluation settings (spec §11), sized for a CPU: k 16 not 64, 512 tokens not 32,768."""
    k: int = field(default=16, metadata={"help": "samples per problem (R1: 4-64 by test-set size)"})
    temperature: float = field(default=0.6, metadata={
        "help": "sampling temperature (R1: 0.6; 0 = greedy, not R1's protocol)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass (R1: 0.95)"})
    max_tokens: int = field(default=512, metadata={"help": "new tokens per response at most (R1: 32,768)"})
    template: str = field(default="r1zero", metadata={
        "help": "prompt: the R1-Zero text template, or the R1 chat template opening <think>",
        "choices": list(TEMPLATES)})
    seed: int = field(default=0, metadata={"help": "sampling seed (each problem's samples derive from it)"})
    n_problems: int = field(default=64, metadata={"help": "problems to evaluate (0: all of a file)"})

    def __post_init__(self):
        if self.k < 1 or self.max_tokens < 1:
            raise ValueError("k and max_tokens must be >= 1")
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}; expected one of {TEMPLATES}")


def problem_seed(seed: int, problem: Problem) -> int:
    """The sampling seed of one problem: a hash of the run seed and the prompt (63 bits).

    >>> p = Problem("What is 2 + 3?", "5")
    >>> problem_seed(0, p) == problem_seed(0, Problem("What is 2 + 3?", "5", {"index": 7}))
    True
    >>> problem_seed(0, p) != problem_seed(1, p)
    True
    """
    digest = hashlib.sha256(f"{seed}|{problem.prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def prompts_for(problems: list[Problem], template: str, tokenizer=None) -> list[str | list[int]]:
    """Engine prompts: R1-Zero texts, or chat-template token ids (needs the R1 tokenizer)."""
    if template == "r1zero":
        return [r1_zero_prompt(p.prompt) for p in problems]
    if not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError("the chat template needs the model's nanoseek tokenizer")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True)
            for p in problems]


def sample(llm, problems: list[Problem], cfg: EvalConfig) -> list[list[Completion]]:
    """k completions per problem, from one engine batch."""
    from nanoseek.engine import SamplingParams  # here: this module (EvalConfig) imports no torch
    prompts = prompts_for(problems, cfg.template, llm.tokenizer)
    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, n=cfg.k,
                             seed=problem_seed(cfg.seed, p)) for p in problems]
    return llm.generate(prompts, params) if prompts else []


def score(problems: list[Problem], outs: list[list[Completion]]) -> list[dict]:
    """Per-problem records: every completion's text, extracted answer, score, length, finish."""
    flat_problems = [p for p, comps in zip(problems, outs, strict=True) for _ in comps]
    answers = [extract_answer(c.text) for comps in outs for c in comps]
    scores = score_many(flat_problems, answers)
    records, i = [], 0
    for p, comps in zip(problems, outs):
        j = i + len(comps)
        records.append({"prompt": p.prompt, "answer": p.answer, "task": p.task,
                        "answers": answers[i:j], "scores": scores[i:j],
                        "lengths": [len(c.token_ids) for c in comps],
                        "finish": [c.finish_reason for c in comps],
                        "texts": [c.text for c in comps]})
        records[-1]["voted"] = majority_vote(records[-1]["answers"])
        i = j
    return records


def summarize(records: list[dict], cfg: EvalConfig) -> dict:
    """The metrics of scored records (see metrics.py); small and JSON-able."""
    scores = [r["scores"] for r in records]
    correct = [[1.0 if s >= 1.0 else 0.0 for s in r] for r in scores]  # R1's p_i in {0, 1}
    lengths = [n for r in records for n in r["lengths"]]
    answers = [a for r in records for a in r["answers"]]
    k = min((len(s) for s in scores), default=cfg.k)
    out = {"n_problems": len(records), "k": k, "pass@1": pass_at_1(correct)}
    for j in pass_k_ladder(k)[1:]:
        out[f"pass@{j}"] = mean_pass_at_k(correct, j)
    out[f"cons@{k}"] = cons_at_k([r["answers"] for r in records], scores)
    out.update({
        "mean_score": pass_at_1(scores),                 # partial credit included (the RL accuracy reward)
        "answered": sum(a is not None for a in answers) / max(1, len(answers)),
        "truncated": sum(f == "length" for r in records for f in r["finish"]) / max(1, len(lengths)),
        "mean_length": statistics.fmean(lengths) if lengths else 0.0,
        "median_length": statistics.median(lengths) if lengths else 0.0,
    })
    right, written = step_accuracy([t for r in records for t in r["texts"]])
    if written:                                          # tasks whose traces write "a op b = c" steps
        out["step_accuracy"], out["steps_per_response"] = right / written, written / max(1, len(lengths))
    out["config"] = {k_: v for k_, v in asdict(cfg).items() if k_ != "n_problems"}
    return out


def evaluate(llm, problems: list[Problem], cfg: EvalConfig | None = None, with_records: bool = False) -> dict:
    """Sample k responses per problem with `llm`, score them with each task's checker, summarize.
    With `with_records`, the result also holds "records": one dict per problem (see `score`)."""
    cfg = cfg or EvalConfig()
    records = score(problems, sample(llm, problems, cfg))
    result = summarize(records, cfg)
    if with_records:
        result["records"] = records
    return result

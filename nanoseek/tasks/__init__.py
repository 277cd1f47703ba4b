"""Verifiable tasks: problem generators, reasoning-trace writers and answer checkers.

One file per family (DESIGN.md layout):
    base.py        Problem, Task contract, trace styles and languages, shared helpers
    arithmetic.py  multi-step integer arithmetic with + - * (steps, digits, products)
    countdown.py   Countdown with small numbers (a search task)
    linear.py      linear equations, where substituting back checks the answer
    reasoning_gym.py  any reasoning-gym dataset as a Task (an outside benchmark: its own checker)
    math_jsonl.py  GSM8K / MATH-500 / AIME style JSONL files scored by math-verify

`get_task(name, **knobs)` builds a task; `task_of(problem)` rebuilds the task a problem came from
(its name and knobs travel in `problem.meta`), so a Problem is enough to score an answer in any
process. Families are imported lazily: `import nanoseek.tasks` does not import reasoning-gym or
math-verify.

Held-out split. `split_of(problem, seed, heldout)` hashes the problem's language-independent key
with the seed: a problem is held out or not by its content alone, so the train and held-out sets
are disjoint by construction for every task (and both wordings of one problem share a split),
and `sample_split` draws from either side by rejection (cheap: sampling costs ~10 µs).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import random
from functools import lru_cache

from nanoseek.tasks.base import CORRECT_STYLES, LANGS, REFLECT_MARKERS, STYLES, Problem, Task, Worked

__all__ = ["Problem", "Task", "Worked", "STYLES", "CORRECT_STYLES", "LANGS", "REFLECT_MARKERS",
           "TASKS", "get_task", "task_of", "score", "score_many", "split_of", "sample_split"]

# registry name -> "module:Class"; "gym:<dataset>" is short for get_task("gym", dataset=<dataset>)
TASKS = {
    "arithmetic": "nanoseek.tasks.arithmetic:Arithmetic",
    "countdown": "nanoseek.tasks.countdown:Countdown",
    "linear": "nanoseek.tasks.linear:Linear",
    "gym": "nanoseek.tasks.reasoning_gym:GymTask",
    "math": "nanoseek.tasks.math_jsonl:MathTask",
}


def get_task(name: str, **knobs) -> Task:
    """A task by registry name, e.g. get_task("arithmetic", steps=(4, 6), digits=3)."""
    if name.startswith("gym:"):
        name, knobs = "gym", {"dataset": name[4:], **knobs}
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)} and gym:<dataset>")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**knobs)


@lru_cache(maxsize=256)
def _cached(name: str, knobs_json: str) -> Task:
    return get_task(name, **json.loads(knobs_json))


def task_of(problem: Problem) -> Task:
    """The task that made `problem` (cached per name and knobs)."""
    knobs = problem.meta.get("knobs", {})
    return _cached(problem.meta["task"], json.dumps(knobs, sort_keys=True))


def score(problem: Problem, answer_text: str | None) -> float:
    """The problem's own checker on an extracted answer; a missing answer or a checker error is 0."""
    if answer_text is None:
        return 0.0
    try:
        return min(1.0, max(0.0, float(task_of(problem).score(problem, answer_text))))
    except Exception:  # a checker must never take down an RL step
        return 0.0


def score_many(problems: list[Problem], answers: list[str | None]) -> list[float]:
    """`score` over a batch; each task checks its share at once (math-verify: in parallel)."""
    out = [0.0] * len(problems)
    groups: dict[int, tuple[Task, list[int]]] = {}
    for i, p in enumerate(problems):
        try:
            task = task_of(p)
        except Exception:
            continue
        groups.setdefault(id(task), (task, []))[1].append(i)
    for task, idx in groups.values():
        try:
            got = task.score_many([problems[i] for i in idx], [answers[i] for i in idx])
        except Exception:
            got = [score(problems[i], answers[i]) for i in idx]
        for i, s in zip(idx, got):
            out[i] = min(1.0, max(0.0, float(s)))
    return out


def split_of(problem: Problem, seed: int, heldout: float) -> str:
    """"heldout" for a fixed share of problems (by content and seed), else "train"."""
    key = f"{seed}|{problem.meta.get('task')}|{problem.meta.get('key', problem.prompt)}"
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
    return "heldout" if h < heldout else "train"


def sample_split(task: Task, rng: random.Random, split: str, seed: int, heldout: float,
                 lang: str | None = None, max_tries: int = 100_000) -> Problem:
    """Sample a problem of `task` that falls in `split` ("train" or "heldout")."""
    for _ in range(max_tries):
        p = task.sample(rng, lang=lang)
        if split_of(p, seed, heldout) == split:
            return p
    raise RuntimeError(f"no {split} problem of {task.name} in {max_tries} tries (heldout={heldout})")

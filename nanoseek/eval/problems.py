"""Which problems an evaluation runs on: held-out task problems, reasoning-gym, or a JSONL file.

`load_problems(task, n, seed=0, data=None)` understands
    "arithmetic", "countdown", "linear"   n held-out problems of our task families, drawn like the
                 corpus draws them: `tasks.sample_split(..., "heldout", seed, HELDOUT)` with
                 HELDOUT the corpus's own held-out share (data/corpus.py CorpusPreset.heldout) and
                 `seed` the corpus seed, so these are problems no pretraining, SFT or RL document
                 of that corpus was built from (the split is by content, tasks/__init__.py).
                 Knobs: the task's defaults, which are the tiny corpus preset's difficulty; to
                 evaluate on exactly a corpus's own evaluation set pass its problems/eval.jsonl.
                 Prompts are English (the task default; the corpus also writes Chinese ones).
                 Duplicates are skipped: linear and countdown have few held-out problems (~1.5k
                 and ~600 distinct ones at the defaults), and a repeated problem would weigh twice.
    "gym:<dataset>"  entries 0..n-1 of a reasoning-gym dataset built with seed `seed`: an outside
                 benchmark, nothing of it is ever trained on, so it has no split.
    a .jsonl path (as `task` or as `data`), either
      - a corpus problems file (CORPUS/problems/eval.jsonl: `Problem.to_dict()` lines, told apart
        by their "prompt" and "meta" keys), or
      - a GSM8K / MATH-500 / AIME layout, read by tasks/math_jsonl.py (scored by math-verify).
    The first n problems in file order (n <= 0: all). With both a task name and `data`, only the
    file's problems of that task are kept (`--task linear --data CORPUS/problems/eval.jsonl`).

The loaded problems carry their task name and knobs in `meta`, so `tasks.score_many` rebuilds
each problem's own checker: the same call as the RL accuracy reward.
"""
from __future__ import annotations

import dataclasses
import json
import random

from nanoseek.data.corpus import CorpusPreset
from nanoseek.tasks import Problem, get_task, sample_split
from nanoseek.tasks.math_jsonl import MathTask

__all__ = ["HELDOUT", "load_problems", "held_out_problems", "read_problem_file", "is_corpus_file"]

HELDOUT = next(f.default for f in dataclasses.fields(CorpusPreset) if f.name == "heldout")


def load_problems(task: str | None, n: int, seed: int = 0, data: str | None = None) -> list[Problem]:
    """Problems for an evaluation (see the module docstring for what `task` and `data` may be)."""
    if task is not None and task.endswith(".jsonl") and data is None:
        task, data = None, task
    if data is not None:
        problems = read_problem_file(data)
        if task is not None:
            problems = [p for p in problems if _same_task(p, task)]
        return problems if n <= 0 else problems[:n]
    if task is None:
        raise ValueError("load_problems needs a task name or a .jsonl file")
    if task.startswith("gym:"):
        gym = get_task(task, seed=seed)
        return [gym.entry(i) for i in range(n)]
    return held_out_problems(task, n, seed)


def held_out_problems(name: str, n: int, seed: int = 0, heldout: float = HELDOUT) -> list[Problem]:
    """n distinct held-out problems of task `name` (fewer only if its held-out set is smaller)."""
    task, out, seen = get_task(name), [], set()
    rng = random.Random(f"{seed}/eval/{name}")
    for _ in range(50 * n):
        if len(out) == n:
            break
        p = sample_split(task, rng, "heldout", seed, heldout)
        key = p.meta.get("key", p.prompt)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def is_corpus_file(path: str) -> bool:
    """Whether a JSONL file holds `Problem.to_dict()` lines (judged by its first record)."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        return False
    rec = json.loads(first)
    return {"prompt", "meta"} <= rec.keys() and "task" in (rec.get("meta") or {})


def read_problem_file(path: str) -> list[Problem]:
    """All problems of a corpus problems file or a math benchmark file, in file order."""
    if not is_corpus_file(path):
        return list(MathTask(path=path).problems)
    with open(path, encoding="utf-8") as f:
        return [Problem.from_dict(json.loads(line)) for line in f if line.strip()]


def _same_task(problem: Problem, task: str) -> bool:
    if task.startswith("gym:"):
        return problem.task == "gym" and problem.meta.get("knobs", {}).get("dataset") == task[4:]
    return problem.task == task

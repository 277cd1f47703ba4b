"""reasoning-gym datasets as Tasks: our outside benchmark and a source of RL prompts.

`get_task("gym:chain_sum")` or `GymTask("chain_sum", seed=0, size=100_000, **config)` wraps any
procedural dataset of reasoning-gym (about 100 generators: arithmetic, logic, puzzles, graphs…).
A problem is one entry: its `question` is the prompt, its `answer` the reference, and the entry
rides in `problem.meta["entry"]` because the dataset's own `score_answer(answer, entry)` is the
checker. nanoseek never writes these answers or traces (`trace` raises): the benchmark stays an
outside judge of what our tasks taught.

Offline: the generators are procedural (they build entries from `random.Random(seed + idx)`), so
nothing is downloaded. reasoning-gym is imported on first use (~1.4 s, it pulls in sympy and
friends), so importing nanoseek does not pay for it. Scores are clamped to [0, 1]; some datasets
give partial credit (the default checker pays len(oracle)/len(answer) when the oracle is a
substring), and a checker that raises scores 0.
"""
from __future__ import annotations

import random
from typing import Any

from nanoseek.tasks.base import Problem, Task


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as e:  # pragma: no cover - it is a dependency, but say what to do
        raise ImportError("reasoning-gym is not installed: pip install reasoning-gym") from e
    return reasoning_gym


def datasets() -> list[str]:
    """Names of all reasoning-gym datasets."""
    return sorted(_reasoning_gym().factory.DATASETS)


class GymTask(Task):
    name = "gym"

    def __init__(self, dataset: str, seed: int = 0, size: int = 100_000, **config: Any):
        super().__init__(dataset=dataset, seed=seed, size=size, **config)
        self.dataset, self.seed, self.size, self.config = dataset, seed, size, config
        self._ds = None

    @property
    def ds(self):
        """The reasoning-gym dataset object, created on first use (once per process)."""
        if self._ds is None:
            self._ds = _reasoning_gym().create_dataset(
                self.dataset, seed=self.seed, size=self.size, **self.config)
        return self._ds

    def entry(self, idx: int) -> Problem:
        """Entry `idx` of the dataset as a Problem."""
        e = self.ds[idx]
        answer = "" if e.get("answer") is None else str(e["answer"])
        return self.problem(e["question"], answer, "en", key=e["question"], index=idx, entry=e)

    def sample(self, rng: random.Random, lang: str | None = None) -> Problem:
        if lang not in (None, "en"):
            raise ValueError("reasoning-gym questions are in English")
        return self.entry(rng.randrange(self.size))

    def score(self, problem: Problem, answer_text: str) -> float:
        try:
            s = self.ds.score_answer(answer_text, problem.meta["entry"])
        except Exception:
            return 0.0
        return min(1.0, max(0.0, float(s or 0.0)))

    def trace(self, *args, **kwargs) -> str:
        raise NotImplementedError("reasoning-gym is an outside benchmark: nanoseek writes no traces for it")

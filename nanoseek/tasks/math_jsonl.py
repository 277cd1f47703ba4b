"""Math benchmarks from local JSONL files (GSM8K, MATH-500, AIME layouts), scored by math-verify.

Layouts read (keys case-insensitive, one JSON object a line):
    GSM8K     {"question": ..., "answer": "...rationale... #### 72"}   -> answer "72" (commas dropped)
    MATH-500  {"problem": ..., "solution": ..., "answer": "\\frac{1}{2}"}
    AIME      {"Problem": ..., "Answer": 204} or {"question": ..., "answer": "204"}
    any       {"problem": ..., "solution": "... \\boxed{x} ..."}     -> the last \\boxed{} of the solution
Files are never downloaded: point `MathTask(path=...)` at a file you have; tests use
tests/data/math_sample.jsonl. The prompt is the problem plus R1's recommended instruction
("Please reason step by step, and put your final answer within \\boxed{}."; spec §11), a knob.

Scoring: math-verify (`parse` + `verify`: 1/2 == 0.5 == \\frac{1}{2}, 2\\sqrt{2} == \\sqrt{8},
symbolic and set equality; see reference/cpu_facts.md §6). Its timeouts use `signal.alarm`, which
works only in a process's main thread: from a worker thread (a server, an RL loop) `parse` raises.
So every check runs in a small process pool, created lazily on first use and reused, whose workers
run math-verify in their own main thread, where the alarm holds. The pool uses the "spawn"
context, not fork: forking a process that has started torch's threads can deadlock the child.
Measured on 2 cores: the pool starts in ~1-2 s (a fresh python importing math-verify), then one
check costs ~1-2 ms (parse + verify + IPC). A check that outlives its alarm anyway (a worker
stuck in C code) is abandoned after `timeout_s * 3 + 10` s, the pool is rebuilt and it scores 0.
Very long inputs keep only their last `MAX_CHARS` characters (a boxed answer sits at the end; the
parse of a 100k-character expression alone takes > 5 s). Scripts that use this need the usual
`if __name__ == "__main__":` guard, as for any spawn-based multiprocessing.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache

from nanoseek.tasks.base import Problem, Task, TraceOpts, Worked, last_boxed

R1_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MAX_CHARS = 2000
_KEYS_PROBLEM = ("problem", "question")
_KEYS_ANSWER = ("answer", "final_answer", "expected_answer")


def read_record(rec: dict) -> tuple[str, str, str]:
    """(problem, answer, solution) of one JSONL record in any supported layout."""
    low = {k.lower(): v for k, v in rec.items()}
    problem = next((str(low[k]) for k in _KEYS_PROBLEM if k in low), None)
    if problem is None:
        raise KeyError(f"no problem/question field in {sorted(rec)}")
    answer = next((low[k] for k in _KEYS_ANSWER if k in low and low[k] is not None), None)
    solution = str(low.get("solution", "") or "")
    if isinstance(answer, str) and "####" in answer:  # GSM8K: rationale, then "#### 72"
        solution, answer = answer.split("####")[0].strip(), answer.split("####")[-1]
        answer = answer.strip().replace(",", "")
    if answer is None and solution:
        answer = last_boxed(solution)
    if answer is None:
        raise KeyError(f"no answer field in {sorted(rec)}")
    solution = re.sub(r"<<[^>]*>>", "", solution)  # GSM8K calculator annotations
    return problem, str(answer).strip(), solution


class MathTask(Task):
    name = "math"

    def __init__(self, path: str | None = None, instruction: str = R1_MATH_INSTRUCTION):
        super().__init__(path=path, instruction=instruction)
        self.path, self.instruction = path, instruction
        self._problems: list[Problem] | None = None

    @property
    def problems(self) -> list[Problem]:
        """All problems of the file, in file order (loaded on first use; scoring needs no file)."""
        if self._problems is None:
            if self.path is None:
                raise ValueError("MathTask needs path= to load problems")
            self._problems = []
            with open(self.path, encoding="utf-8") as f:
                for i, line in enumerate(ln for ln in f if ln.strip()):
                    q, a, sol = read_record(json.loads(line))
                    prompt = f"{q}\n{self.instruction}" if self.instruction else q
                    self._problems.append(self.problem(prompt, a, "en", key=q, index=i, solution=sol))
        return self._problems

    def sample(self, rng: random.Random, lang: str | None = None) -> Problem:
        return rng.choice(self.problems)

    def score(self, problem: Problem, answer_text: str) -> float:
        return verify(problem.answer, answer_text)

    def score_many(self, problems: list[Problem], answers: list[str | None]) -> list[float]:
        return verify_many([(p.answer, a) for p, a in zip(problems, answers)])

    def work(self, problem: Problem, rng: random.Random, style: str, lang: str,
             opts: TraceOpts) -> Worked:
        """The file's own solution, when it has one (only the "steps" style exists here)."""
        sol = problem.meta.get("solution")
        if style != "steps" or not sol:
            raise NotImplementedError("math benchmarks have only their own solutions as traces")
        return Worked(sol, problem.answer, f"The answer is \\boxed{{{problem.answer}}}.", True)


# --- the math-verify process pool -----------------------------------------------------------------
_POOL: ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


# Run first in each worker (as `exec(_WORKER_PRELUDE)`: a builtin, so unpickling it imports
# nothing). The workers import only nanoseek.tasks (the package __init__ is lazy: no torch).
_WORKER_PRELUDE = """
import logging
for name in ('math_verify', 'latex2sympy2_extended'):  # they log the whole input on a timeout
    logging.getLogger(name).setLevel(logging.CRITICAL)
import math_verify  # now, so the first check is not the slow one
"""


def pool() -> ProcessPoolExecutor:
    """The shared verification pool (spawn context), created on first use."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            workers = int(os.environ.get("NANOSEEK_VERIFY_WORKERS", min(2, os.cpu_count() or 1)))
            _POOL = ProcessPoolExecutor(max_workers=workers, initializer=exec,
                                        initargs=(_WORKER_PRELUDE, {}),   # its own globals
                                        mp_context=multiprocessing.get_context("spawn"))
        return _POOL


def shutdown() -> None:
    """Stop the pool's workers (a later check starts a new pool)."""
    global _POOL
    with _POOL_LOCK:
        p, _POOL = _POOL, None
    if p is not None:
        for proc in list(getattr(p, "_processes", {}).values()):  # a stuck worker must not linger
            proc.terminate()
        p.shutdown(wait=False, cancel_futures=True)


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int):
    from math_verify import parse
    return parse(gold if "\\boxed" in gold else "\\boxed{" + gold + "}", parsing_timeout=timeout_s)


def _verify_in_worker(gold: str, pred: str, timeout_s: int) -> float:
    """Runs in a pool worker's main thread, where math-verify's signal.alarm timeouts work."""
    from math_verify import parse, verify as mv_verify
    try:
        g = _parse_gold(gold, timeout_s)
        pred = pred[-MAX_CHARS:]
        tries = [pred] if ("\\boxed" in pred or "$" in pred) else [pred, "\\boxed{" + pred + "}"]
        for text in tries:
            p = parse(text, parsing_timeout=timeout_s)
            if p and mv_verify(g, p, timeout_seconds=timeout_s):
                return 1.0
    except Exception:  # a timeout or a parser error: not a correct answer
        return 0.0
    return 0.0


def verify(gold: str, pred: str | None, timeout_s: int = 5) -> float:
    """1.0 if math-verify finds `pred` equal to `gold`, else 0.0; never raises. Thread-safe."""
    return verify_many([(gold, pred)], timeout_s)[0]


def verify_many(pairs: list[tuple[str, str | None]], timeout_s: int = 5) -> list[float]:
    """Check many (gold, pred) pairs in parallel on the pool; empty or None predictions score 0.

    `timeout_s` is math-verify's per-call alarm, whole seconds (signal.alarm takes an int; a
    fractional value makes math-verify fail every call), so it is rounded up to at least 1.
    """
    timeout_s = max(1, int(round(timeout_s)))
    out = [0.0] * len(pairs)
    todo = [(i, g, p) for i, (g, p) in enumerate(pairs) if p and p.strip() and g is not None]
    if not todo:
        return out
    try:
        futures = [(i, pool().submit(_verify_in_worker, str(g), p, timeout_s)) for i, g, p in todo]
        for i, fut in futures:
            out[i] = fut.result(timeout=timeout_s * 3 + 10)
    except (FutureTimeout, BrokenProcessPool):
        shutdown()  # a stuck or dead worker: start over next time; the rest score 0
    return out

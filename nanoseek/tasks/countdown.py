"""Countdown with small numbers: combine the given numbers with +, - and * to reach a target.

Problem: "Using the numbers 3, 5, 7, 2, make 38. ..." (zh: "用数字 3、5、7、2 凑出 38。…"); the
answer is an expression, e.g. "(7 - 2) * 5 + 3". Each number at most once; any correct expression
scores 1 (the reference answer is one of possibly many). Knobs: `numbers` (min, max) how many,
`max_number` their size, `max_target`.

A search task (TinyZero's R1-Zero demonstration used Countdown): the trace tries candidates,
computes each one step by step and says whether it hits. A slip here is an arithmetic error that
makes a near miss look like a hit ("35 + 2 = 38"), so the mistake style commits to a wrong
expression; the check style recomputes the candidate, finds the miss, and searches on.
Intermediate values are kept non-negative so that small numbers stay small.
"""
from __future__ import annotations

import ast
import random
from collections import Counter
from typing import Union

from nanoseek.tasks.base import COMMON, Phrases, Problem, Task, TraceOpts, Worked

Expr = Union[int, tuple]  # an int, or (op, left, right)
P = Phrases({
    "prompt": {"en": "Using the numbers {ns}, make {t}. Use +, - and * with parentheses, "
                     "each number at most once.",
               "zh": "用数字 {ns} 凑出 {t}。可以用 +、-、* 和括号，每个数字最多用一次。"},
    "try": {"en": "Try {e}: {calc}.", "zh": "试试 {e}：{calc}。"},
    "miss": {"en": "That gives {v}, not {t}.", "zh": "得到 {v}，不是 {t}。"},
    "hit": {"en": "That gives {t}. It works.", "zh": "得到 {t}，成功了。"},
    "recheck": {"en": " {calc}, not {t}. Keep searching.", "zh": "{calc}，不是 {t}。继续找。"},
    "recap": {"en": "{e} = {t}.", "zh": "{e} = {t}。"},
})
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


def value(e: Expr) -> int:
    if isinstance(e, int):
        return e
    op, a, b = e
    x, y = value(a), value(b)
    return x + y if op == "+" else x - y if op == "-" else x * y


def render(e: Expr, parent: str = "", right: bool = False) -> str:
    """Minimal parentheses: a sum inside a product, or a sum/difference right of a minus."""
    if isinstance(e, int):
        return str(e)
    op, a, b = e
    s = f"{render(a, op)} {op} {render(b, op, right=True)}"
    need = (parent == "*" and op in "+-") or (parent == "-" and right and op in "+-")
    return f"({s})" if need else s


def steps(e: Expr) -> list[tuple[int, str, int, int]]:
    """Post-order list of (a, op, b, a op b)."""
    if isinstance(e, int):
        return []
    op, a, b = e
    out = steps(a) + steps(b)
    x, y = value(a), value(b)
    return out + [(x, op, y, value(e))]


def leaves(e: Expr) -> list[int]:
    return [e] if isinstance(e, int) else leaves(e[1]) + leaves(e[2])


def random_expr(nums: list[int], rng: random.Random) -> Expr:
    """A random binary tree over `nums` (in order) with random operations."""
    if len(nums) == 1:
        return nums[0]
    k = rng.randint(1, len(nums) - 1)
    return (rng.choice("+-*"), random_expr(nums[:k], rng), random_expr(nums[k:], rng))


def parse(text: str) -> tuple[int, list[int]] | None:
    """Value and numbers of an answer like "(7 - 2) * 5 + 3" (optionally "= 38"); None if invalid."""
    text = text.replace("×", "*").replace("−", "-").split("=")[0].strip()
    if not text or len(text) > 200:
        return None
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError):
        return None

    def walk(node) -> tuple[int, list[int]]:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value, [node.value]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            (x, xs), (y, ys) = walk(node.left), walk(node.right)
            return value((_OPS[type(node.op)], x, y)), xs + ys
        raise ValueError("not allowed")
    try:
        return walk(tree)
    except (ValueError, RecursionError):
        return None


class Countdown(Task):
    name = "countdown"

    def __init__(self, numbers: tuple[int, int] = (3, 4), max_number: int = 10,
                 max_target: int = 100, lang: str = "en"):
        super().__init__(numbers=list(numbers), max_number=max_number, max_target=max_target, lang=lang)
        self.numbers, self.max_number, self.max_target, self.lang = tuple(numbers), max_number, max_target, lang

    def _ok(self, e: Expr, nums: list[int]) -> bool:
        v = value(e)
        return 1 <= v <= self.max_target and v not in nums and all(c >= 0 for *_, c in steps(e))

    def sample(self, rng: random.Random, lang: str | None = None) -> Problem:
        lang = lang or self.lang
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(rng.randint(*self.numbers))]
            order = nums[:]
            rng.shuffle(order)
            e = random_expr(order, rng)
            if self._ok(e, nums):
                break
        t = value(e)
        sep = "、" if lang == "zh" else ", "
        prompt = P("prompt", lang, rng, ns=sep.join(map(str, nums)), t=t)
        key = f"{sorted(nums)}->{t}"
        return self.problem(prompt, render(e), lang, key=key, numbers=nums, target=t)

    def score(self, problem: Problem, answer_text: str) -> float:
        got = parse(answer_text or "")
        if got is None:
            return 0.0
        v, used = got
        ok = v == problem.meta["target"] and not (Counter(used) - Counter(problem.meta["numbers"]))
        return float(ok)

    def _near_misses(self, nums: list[int], t: int, rng: random.Random, n: int = 40) -> list[Expr]:
        """Wrong candidates over random subsets, nearest to the target first."""
        found: dict[str, Expr] = {}
        for _ in range(n):
            sub = rng.sample(nums, rng.randint(2, len(nums)))
            e = random_expr(sub, rng)
            if value(e) != t and all(c >= 0 for *_, c in steps(e)):
                found.setdefault(render(e), e)
        out = sorted(found.values(), key=lambda e: abs(value(e) - t))
        return out or [("+", nums[0], nums[1])]

    def work(self, problem: Problem, rng: random.Random, style: str, lang: str,
             opts: TraceOpts) -> Worked:
        nums, t = problem.meta["numbers"], problem.meta["target"]
        sol = ast.parse(problem.answer, mode="eval").body
        sol_e = _to_expr(sol)
        misses = self._near_misses(nums, t, rng)
        if style == "direct":
            wrong = render(misses[-1] if rng.random() < 0.5 else misses[0])
            return self.direct(lang, rng, opts, problem.answer, wrong,
                               P("recap", lang, rng, e=problem.answer, t=t),
                               P("recap", lang, rng, e=wrong, t=t))
        lines = [opts.opening]
        for e in misses[len(misses) // 2:][:rng.randint(0, 2)]:  # dead ends, written honestly
            lines += [self._try(e, lang, rng), P("miss", lang, rng, v=value(e), t=t)]
        if style in ("mistake", "check"):
            m = misses[0]  # the nearest miss, its last step slipped onto the target
            lines += [self._try(m, lang, rng, slip_to=t), P("hit", lang, rng, t=t)]
            if style == "mistake":
                return self._done(lines, render(m), t, lang, rng, correct=False)
            calc = ", ".join(f"{a} {op} {b} = {c}" for a, op, b, c in steps(m))
            lines.append(COMMON("wait", lang, rng)
                         + P("recheck", lang, rng, calc=calc, t=t))
        lines += [self._try(sol_e, lang, rng), P("hit", lang, rng, t=t)]
        return self._done(lines, problem.answer, t, lang, rng, correct=True)

    def _try(self, e: Expr, lang: str, rng: random.Random, slip_to: int | None = None) -> str:
        st = steps(e)
        if slip_to is not None:
            a, op, b, _ = st[-1]
            st[-1] = (a, op, b, slip_to)
        calc = ", ".join(f"{a} {op} {b} = {c}" for a, op, b, c in st)
        return P("try", lang, rng, e=render(e), calc=calc)

    def _done(self, lines: list[str], ans: str, t: int, lang: str, rng: random.Random,
              correct: bool) -> Worked:
        lines.append(COMMON("so", lang, rng, x=ans))
        summary = P("recap", lang, rng, e=ans, t=t) + "\n" + COMMON("boxed", lang, rng, x=ans)
        return Worked("\n".join(lines), ans, summary, correct)

    def drill(self, rng: random.Random, lang: str | None = None, lines: int = 8) -> str:
        out = []
        for _ in range(lines):
            a, b = rng.randint(1, self.max_number * 3), rng.randint(1, self.max_number)
            op = rng.choice("+-*")
            a, b = (b, a) if op == "-" and a < b else (a, b)
            out.append(f"{a} {op} {b} = {value((op, a, b))}")
        return "\n".join(out)


def _to_expr(node) -> Expr:
    if isinstance(node, ast.Constant):
        return node.value
    return (_OPS[type(node.op)], _to_expr(node.left), _to_expr(node.right))

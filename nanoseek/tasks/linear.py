"""Linear equations in one unknown: "Solve for x: 3x + 14 = 5x - 6." -> 10.

The family that rewards checking work: an answer is verified by substituting it back, which is
cheaper and independent of the steps that found it. A slip (in collecting the numbers, or in
the division) gives an x off by one; the check style substitutes, sees the two sides differ,
redoes the slipped step and substitutes again. Correct traces of the check style also end with
the substitution that confirms them. Knobs: `coef` the largest coefficient, `x_max` the
largest |x|, `both_sides` the chance of x on both sides, `negative` whether x may be negative.
"""
from __future__ import annotations

import random

from nanoseek.tasks.base import COMMON, Phrases, Problem, Task, TraceOpts, Worked, fmt_signed, near_miss, parse_int

P = Phrases({
    "prompt": {"en": "Solve for x: {eq}.", "zh": "解方程 {eq}，求 x。"},
    "xs": {"en": "Collect the x terms: {p}x - {q}x = {e}x.", "zh": "合并 x 项：{p}x - {q}x = {e}x。"},
    "ns": {"en": "Collect the numbers: {calc} = {k}.", "zh": "合并常数：{calc} = {k}。"},
    "eq": {"en": "So {e}x = {k}.", "zh": "所以 {e}x = {k}。"},
    "div": {"en": "Then x = {k} / {e} = {x}.", "zh": "于是 x = {k} / {e} = {x}。"},
    "match": {"en": "Check: {calc}. Both sides are {v}.", "zh": "检查：{calc}。两边都是 {v}。"},
    "differ": {"en": " {calc}. But {l} is not {r}, so I made a mistake. Let me redo it.",
               "zh": "{calc}。但 {l} 不等于 {r}，我算错了。重新算。"},
    "recap": {"en": "{eq}, so x = {x}.", "zh": "{eq}，所以 x = {x}。"},
})


def side(a: int, b: int) -> str:
    """a*x + b as text; a == 0 means a plain number."""
    if a == 0:
        return str(b)
    return f"{a}x" if b == 0 else f"{a}x + {b}" if b > 0 else f"{a}x - {-b}"


def minus(m: int, n: int) -> str:
    return f"{m} - {n}" if n >= 0 else f"{m} + {-n}"


class Linear(Task):
    name = "linear"

    def __init__(self, coef: int = 9, x_max: int = 20, both_sides: float = 0.5,
                 negative: bool = False, lang: str = "en"):
        super().__init__(coef=coef, x_max=x_max, both_sides=both_sides, negative=negative, lang=lang)
        self.coef, self.x_max, self.both_sides, self.negative, self.lang = coef, x_max, both_sides, negative, lang

    def sample(self, rng: random.Random, lang: str | None = None) -> Problem:
        lang = lang or self.lang
        x = rng.randint(1, self.x_max) * (rng.choice((-1, 1)) if self.negative else 1)
        a = rng.randint(2, self.coef)
        c = rng.choice([k for k in range(2, self.coef + 1) if k != a]) if rng.random() < self.both_sides else 0
        b = rng.choice((-1, 1)) * rng.randint(1, 50)
        d = a * x + b - c * x
        eq = f"{side(a, b)} = {side(c, d)}"
        return self.problem(P("prompt", lang, rng, eq=eq), x, lang, key=eq, a=a, b=b, c=c, d=d)

    def score(self, problem: Problem, answer_text: str) -> float:
        got = parse_int(answer_text)
        return float(got is not None and str(got) == problem.answer.strip())

    def _plan(self, m):
        """(p, q, e, m_, n_): p x - q x = e x on one side, m_ - n_ = k on the other."""
        a, b, c, d = m["a"], m["b"], m["c"], m["d"]
        return (a, c, a - c, d, b) if a > c else (c, a, c - a, b, d)

    def _substitute(self, m, x: int) -> tuple[str, int, int]:
        a, b, c, d = m["a"], m["b"], m["c"], m["d"]
        lhs, rhs = a * x + b, c * x + d
        plus = lambda k: "" if k == 0 else f" + {k}" if k > 0 else f" - {-k}"  # noqa: E731
        left = f"{a} * {fmt_signed(x)}{plus(b)} = {lhs}"
        if c == 0:
            return left, lhs, rhs
        return f"{left}; {c} * {fmt_signed(x)}{plus(d)} = {rhs}", lhs, rhs

    def work(self, problem: Problem, rng: random.Random, style: str, lang: str,
             opts: TraceOpts) -> Worked:
        m, x = problem.meta, int(problem.answer)
        eq = f"{side(m['a'], m['b'])} = {side(m['c'], m['d'])}"
        recap = lambda v: P("recap", lang, rng, eq=eq, x=v)  # noqa: E731
        if style == "direct":
            wrong = str(near_miss(x, rng))
            return self.direct(lang, rng, opts, str(x), wrong, recap(x), recap(wrong))
        p, q, e, mm, nn = self._plan(m)
        k = mm - nn
        lines = [opts.opening]
        if q:
            lines.append(P("xs", lang, rng, p=p, q=q, e=e))
        slip = rng.choice(("ns", "div")) if style in ("mistake", "check") else None
        k_w = k + rng.choice((-1, 1)) * e if slip == "ns" else k
        x_w = k_w // e if slip != "div" else x + rng.choice((-1, 1))
        lines += [P("ns", lang, rng, calc=minus(mm, nn), k=k_w), P("eq", lang, rng, e=e, k=k_w),
                  P("div", lang, rng, k=k_w, e=e, x=x_w)]
        if style == "check" and slip:
            calc, lhs, rhs = self._substitute(m, x_w)
            lines.append(COMMON("wait", lang, rng) + P("differ", lang, rng, calc=calc, l=lhs, r=rhs))
            lines += [P("ns", lang, rng, calc=minus(mm, nn), k=k), P("eq", lang, rng, e=e, k=k),
                      P("div", lang, rng, k=k, e=e, x=x)]
            x_w = x
        if style == "check":
            calc, lhs, _ = self._substitute(m, x_w)
            lines.append(P("match", lang, rng, calc=calc, v=lhs))
        lines.append(COMMON("so", lang, rng, x=x_w))
        summary = recap(x_w) + "\n" + COMMON("boxed", lang, rng, x=x_w)
        return Worked("\n".join(lines), str(x_w), summary, x_w == x)

    def drill(self, rng: random.Random, lang: str | None = None, lines: int = 6) -> str:
        """Substitutions: "x = 7: 3 * 7 + 14 = 35" (the check this family teaches)."""
        out = []
        for _ in range(lines):
            x, a, b = rng.randint(1, self.x_max), rng.randint(2, self.coef), rng.randint(-50, 50)
            out.append(f"x = {x}: {a} * {x} {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}")
        return "\n".join(out)

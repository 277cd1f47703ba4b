"""Multi-step integer arithmetic: chains of +, - and * with the usual precedence.

Problem: "What is 37 + 48 - 12 * 3?" (zh: "计算 37 + 48 - 12 * 3 等于多少？"), answer an integer.
Difficulty knobs: `steps` (min, max) operations, `digits` of the +/- operands, `mul` the chance
that an operation is a product (a `digits`-digit number times a single digit 2..9; never two
products in a row, so numbers stay in a few digits).

The worked trace computes the products first, then the sum from left to right, one operation
per line. A slip is a near miss (off by 1, 2, 10 or 20). The check style catches it by another
route, so the check is real verification and not a copy of the step:
    a + b = w  ->  w - b = r, not a          a - b = w  ->  w + b = r, not a
    a * b = w  ->  (a - a%10) * b + (a%10) * b = t, not w     (one digit: b * a = t)
`running` (off by default) writes the trace as a rewriting of the expression, one operation a line,
each line ending in what is left ("We compute 9 - 3 * 2 + 7." / "3 * 2 = 6, leaving 9 - 6 + 7." /
"9 - 6 = 3, leaving 3 + 7." / "3 + 7 = 10."): the operands of a step are always the first ones
(or the product's) of the line just above, a few tokens back, instead of the k-th operand of an
expression further up that the model has to keep count of. A slip carries into what is left; the
check style catches it inside the line ("3 + 7 = 11. Wait, let me check: 11 - 7 = 4, not 3. So
3 + 7 = 10, leaving ...") and `verify` re-checks a correct step the same way ("... Check: 10 - 7 =
3. Good, leaving ...").
`restate` (off by default) writes the expression again right after the opening ("We compute
37 + 48 - 12 * 3."): measured on a 4M model pretrained 800 steps on single-digit chains, traces
without it invented their operands (65 % of the written steps were right arithmetic, but the
numbers were rarely the question's: pass@1 2.5 % at T = 0.6), because each step has to fetch the
next operand from the prompt; with the expression copied once as a contiguous span next to the
steps, each operand is a few tokens away.
Why products: the pilot's +/- chains of 3–5 operations were too easy (step by step was almost
always right, so checking never paid and RL had no reason to grow reflection); a product per
chain and two-digit operands make plain step by step fail often enough for checking to matter.
"""
from __future__ import annotations

import random

from nanoseek.tasks.base import COMMON, Phrases, Problem, Task, TraceOpts, Worked, near_miss, parse_int

P = Phrases({
    "prompt": {"en": "What is {e}?", "zh": "计算 {e} 等于多少？"},
    "mul": {"en": "Multiply: {a} * {b} = {c}.", "zh": "乘法：{a} * {b} = {c}。"},
    "now": {"en": "Now the sum is {e}.", "zh": "现在算 {e}。"},
    "add": {"en": "Then {a} {op} {b} = {c}.", "zh": "然后 {a} {op} {b} = {c}。"},
    "not": {"en": " {calc}, not {want}. So {a} {op} {b} = {c}.",
            "zh": "{calc}，不是 {want}。所以 {a} {op} {b} = {c}。"},
    "good": {"en": "Check: {calc}. Good.", "zh": "检查：{calc}，对。"},
    "recap": {"en": "{e} = {x}.", "zh": "{e} = {x}。"},
    "restate": {"en": "We compute {e}.", "zh": "算式：{e}。"},
    # the running form (`running=True`): each step rewrites what is left of the expression
    "leave": {"en": ", leaving {e}.", "zh": "，剩下 {e}。"},
    "end": {"en": ".", "zh": "。"},
    "good2": {"en": ". Check: {calc}. Good", "zh": "。检查：{calc}，对"},
    "fix": {"en": ". {wait} {calc}, not {want}. So {a} {op} {b} = {c}",
            "zh": "。{wait}{calc}，不是 {want}。所以 {a} {op} {b} = {c}"},
})


def expression(nums: list[int], ops: list[str]) -> str:
    parts = [str(nums[0])]
    for op, n in zip(ops, nums[1:]):
        parts += [op, str(n)]
    return " ".join(parts)


def evaluate(nums: list[int], ops: list[str]) -> int:
    return sum(sign * _product(fs) for sign, fs in terms(nums, ops))


def terms(nums: list[int], ops: list[str]) -> list[tuple[int, list[int]]]:
    """37 + 48 - 12 * 3 -> [(+1, [37]), (+1, [48]), (-1, [12, 3])]."""
    out = [(1, [nums[0]])]
    for op, n in zip(ops, nums[1:]):
        if op == "*":
            out[-1][1].append(n)
        else:
            out.append((1 if op == "+" else -1, [n]))
    return out


def _product(fs: list[int]) -> int:
    p = 1
    for f in fs:
        p *= f
    return p


def recheck(a: int, op: str, b: int, w: int) -> tuple[str, int]:
    """Recompute `a op b = w` by another route: (the calculation as text, what it should equal)."""
    if op == "+":
        return f"{w} - {b} = {w - b}", a
    if op == "-":
        return f"{w} + {b} = {w + b}", a
    hi, lo = a - a % 10, a % 10
    if hi == 0 or lo == 0:
        return f"{b} * {a} = {b * a}", w
    return f"{hi} * {b} + {lo} * {b} = {hi * b} + {lo * b} = {a * b}", w


class Arithmetic(Task):
    name = "arithmetic"

    def __init__(self, steps: tuple[int, int] = (3, 5), digits: int = 2, mul: float = 0.3,
                 lang: str = "en", restate: bool = False, running: bool = False):
        # `restate`/`running` are recorded only when on, so the knobs (and corpora) of earlier presets
        # stay as they were
        extra = {k: True for k, on in (("restate", restate), ("running", running)) if on}
        super().__init__(steps=list(steps), digits=digits, mul=mul, lang=lang, **extra)
        self.steps, self.digits, self.mul, self.lang = tuple(steps), digits, mul, lang
        self.restate, self.running = restate, running

    def _operand(self, rng: random.Random) -> int:
        lo = 10 ** (self.digits - 1) if self.digits > 1 else 1
        return rng.randint(lo, 10 ** self.digits - 1)

    def sample(self, rng: random.Random, lang: str | None = None) -> Problem:
        lang = lang or self.lang
        n_ops = rng.randint(*self.steps)
        nums, ops = [self._operand(rng)], []
        for _ in range(n_ops):
            prev_mul = bool(ops) and ops[-1] == "*"
            op = "*" if (not prev_mul and rng.random() < self.mul) else rng.choice("+-")
            ops.append(op)
            nums.append(rng.randint(2, 9) if op == "*" else self._operand(rng))
        e = expression(nums, ops)
        return self.problem(P("prompt", lang, rng, e=e), evaluate(nums, ops), lang, key=e,
                            nums=nums, ops=ops)

    def score(self, problem: Problem, answer_text: str) -> float:
        got = parse_int(answer_text)
        return float(got is not None and str(got) == problem.answer.strip())

    def work(self, problem: Problem, rng: random.Random, style: str, lang: str,
             opts: TraceOpts) -> Worked:
        nums, ops = problem.meta["nums"], problem.meta["ops"]
        e, x = expression(nums, ops), int(problem.answer)
        recap = lambda v: P("recap", lang, rng, e=e, x=v)  # noqa: E731
        if style == "direct":
            wrong = str(near_miss(x, rng))
            return self.direct(lang, rng, opts, str(x), wrong, recap(x), recap(wrong))
        ts = terms(nums, ops)
        n_steps = sum(len(fs) - 1 for _, fs in ts) + len(ts) - 1
        slip = rng.randrange(n_steps) if style in ("mistake", "check") else -1
        lines = [opts.opening] + ([P("restate", lang, rng, e=e)] if self.restate or self.running else [])
        if self.running:
            final = self._walk_running(list(nums), list(ops), slip, style, lang, rng, opts.verify, lines)
        else:
            final = self._walk(ts, slip, style, lang, rng, opts.verify, lines)
        lines.append(COMMON("so", lang, rng, x=final))
        summary = recap(final) + "\n" + COMMON("boxed", lang, rng, x=final)
        return Worked("\n".join(lines), str(final), summary, final == x)

    def _walk(self, ts, slip: int, style: str, lang: str, rng: random.Random, verify: float,
              lines: list[str]) -> int:
        """Write the steps into `lines`; a slip at step `slip` is carried on or caught."""
        i = 0

        def step(key: str, a: int, op: str, b: int) -> int:
            nonlocal i
            true = a + b if op == "+" else a - b if op == "-" else a * b
            wrote = near_miss(true, rng) if i == slip else true
            lines.append(P(key, lang, rng, a=a, op=op, b=b, c=wrote))
            calc, want = recheck(a, op, b, wrote)
            if i == slip and style == "check":
                lines.append(COMMON("wait", lang, rng) + P("not", lang, rng, calc=calc, want=want,
                                                           a=a, op=op, b=b, c=true))
                wrote = true
            elif i != slip and style == "check" and rng.random() < verify:
                lines.append(P("good", lang, rng, calc=calc))
            i += 1
            return wrote

        values = []
        for _, fs in ts:
            v = fs[0]
            for f in fs[1:]:
                v = step("mul", v, "*", f)
            values.append(v)
        if len(ts) > 1 and any(len(fs) > 1 for _, fs in ts):
            signs = ["+" if s > 0 else "-" for s, _ in ts[1:]]
            lines.append(P("now", lang, rng, e=expression(values, signs)))
        acc = values[0]
        for (sign, _), v in zip(ts[1:], values[1:]):
            acc = step("add", acc, "+" if sign > 0 else "-", v)
        return acc

    def _walk_running(self, nums: list[int], ops: list[str], slip: int, style: str, lang: str,
                      rng: random.Random, verify: float, lines: list[str]) -> int:
        """The running form: reduce the leftmost product, else the leftmost operation, a line each."""
        i = 0
        while ops:
            k = ops.index("*") if "*" in ops else 0
            a, op, b = nums[k], ops[k], nums[k + 1]
            true = a + b if op == "+" else a - b if op == "-" else a * b
            wrote = near_miss(true, rng) if i == slip else true
            calc, want = recheck(a, op, b, wrote)
            line = f"{a} {op} {b} = {wrote}"
            if i == slip and style == "check":
                line += P("fix", lang, rng, wait=COMMON("wait", lang, rng), calc=calc, want=want,
                          a=a, op=op, b=b, c=true)
                wrote = true
            elif i != slip and style == "check" and rng.random() < verify:
                line += P("good2", lang, rng, calc=calc)
            nums[k:k + 2], ops[k:k + 1] = [wrote], []
            line += P("leave", lang, rng, e=expression(nums, ops)) if ops else P("end", lang, rng)
            lines.append(line)
            i += 1
        return nums[0]

    def drill(self, rng: random.Random, lang: str | None = None, lines: int = 8) -> str:
        """True one-operation facts of the kinds the traces use (language-free)."""
        out = []
        for _ in range(lines):
            op = rng.choice("+-*")
            a = self._operand(rng)
            b = rng.randint(2, 9) if op == "*" else self._operand(rng)
            c = a + b if op == "+" else a - b if op == "-" else a * b
            out.append(f"{a} {op} {b} = {c}")
        return "\n".join(out)

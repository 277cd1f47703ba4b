"""The Task contract and what every task family shares: problems, worked traces, styles, languages.

A task family is a problem generator, a trace writer and a checker in one object (STYLE.md §5:
tasks own their checking, so RL rewards and evaluation can never drift apart):

    sample(rng, lang=None) -> Problem(prompt, answer, meta)
    trace(problem, rng, style=None, lang=None, **opts) -> str   the R1-Zero completion text
    score(problem, answer_text) -> float in [0, 1]               answer_text is already extracted

`rng` is always a `random.Random`, so a seed fixes every problem and every trace.

Problem.meta carries the task's registry name and knobs (`meta["task"]`, `meta["knobs"]`), so
`nanoseek.tasks.task_of(problem)` rebuilds the checker anywhere, after pickling, in a worker
process, from a JSONL line. It also carries `lang` (the prompt's language, for the language
consistency reward) and `key` (the problem's language-independent identity, for the held-out
split: the English and Chinese wording of one problem land in the same split).

Trace styles (DESIGN.md, "The tiny CPU preset"): a base model pretrained on them has to be able to
guess, to reason, to slip and to catch a slip, so that R1-Zero's RL has behaviours to select:
    direct   no steps, just an answer (a guess: right with probability `direct_accuracy`)
    steps    step by step, correct
    mistake  step by step with one slip carried to a wrong answer
    check    step by step with one slip that a "Wait, let me check" catches and corrects
             (the check recomputes by another route, e.g. the inverse operation, so it really
             can detect the slip); `verify` also re-checks correct steps ("Check: ... Good.")
Languages: "en", "zh", and "mix" (each sentence picks one at random: the language mixing that
R1's language-consistency reward is there to remove).

Openings. What the base model writes first after `<think>` decides which style it samples, and
at low temperature the *mode* of the first tokens wins, not the mix (the pilot: a single fixed
step-by-step opening beat a guessing style spread over several openings, giving pass@1 55 % at
T = 0.6 against 16 % at T = 1.0). So openings are a knob (`opening=`), chosen by the corpus preset.
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

STYLES = ("direct", "steps", "mistake", "check")
CORRECT_STYLES = ("steps", "check")  # always end in the right answer; "direct" only sometimes
LANGS = ("en", "zh")
# what marks a reflection in a trace (for measuring the "aha moment": share of responses that check)
REFLECT_MARKERS = ("Wait, let me check", "等等，让我检查一下")

DEFAULT_OPENINGS = {
    "direct": {"en": ["The answer is"], "zh": ["答案是"]},
    "steps": {
        "en": ["Let me work it out step by step.", "Step by step:", "I will go one step at a time.",
               "OK, one operation at a time.", "Working it out:", "We compute in order."],
        "zh": ["我们一步一步来算。", "逐步计算：", "好，一步一步算。", "按顺序计算："],
    },
}


@dataclass
class Problem:
    """One verifiable problem. `answer` is a reference answer as text; the task's `score` decides."""
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.meta.get("task", "")

    @property
    def lang(self) -> str:
        return self.meta.get("lang", "en")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(prompt=d["prompt"], answer=d["answer"], meta=dict(d.get("meta", {})))


@dataclass
class Worked:
    """A trace before formatting: the reasoning, the answer it commits to, a recap for chat."""
    thinking: str
    answer: str
    summary: str
    correct: bool


@dataclass
class TraceOpts:
    """Knobs of the trace writer (set by the corpus preset, not by the problem distribution)."""
    opening: str | None = None     # first sentence of the reasoning (the direct style: its prefix)
    direct_accuracy: float = 0.2   # how often a direct answer is right
    verify: float = 0.0            # in the check style, share of correct steps also re-checked


def r1_zero_completion(w: Worked) -> str:
    """What follows "Assistant:" in an R1-Zero document (the template asks for both tag pairs)."""
    return f"<think>\n{w.thinking}\n</think>\n<answer>\n{w.answer}\n</answer>"


class Phrases:
    """A phrasebook: key -> {"en": template, "zh": template}; lang "mix" picks per sentence."""

    def __init__(self, table: dict[str, dict[str, str]]):
        self.table = table

    def __call__(self, key: str, lang: str, rng: random.Random, **kw) -> str:
        if lang == "mix":
            lang = rng.choice(LANGS)
        return self.table[key][lang].format(**kw)


COMMON = Phrases({
    "so": {"en": "So the answer is {x}.", "zh": "所以答案是 {x}。"},
    "boxed": {"en": "The answer is \\boxed{{{x}}}.", "zh": "答案是 \\boxed{{{x}}}。"},
    "wait": {"en": "Wait, let me check:", "zh": "等等，让我检查一下："},
})


def pick_opening(style: str, lang: str, rng: random.Random) -> str:
    """A default opening for a style ("mistake"/"check" open like "steps": they diverge later)."""
    group = "direct" if style == "direct" else "steps"
    lang = rng.choice(LANGS) if lang == "mix" else lang
    return rng.choice(DEFAULT_OPENINGS[group][lang])


class Task:
    """Base class of the task families. Subclasses set `name` and implement sample/work/score."""
    name = "task"

    def __init__(self, **knobs: Any):
        self.knobs = dict(knobs)

    def sample(self, rng: random.Random, lang: str | None = None) -> Problem:
        raise NotImplementedError

    def work(self, problem: Problem, rng: random.Random, style: str, lang: str,
             opts: TraceOpts) -> Worked:
        raise NotImplementedError(f"task {self.name!r} writes no traces")

    def score(self, problem: Problem, answer_text: str) -> float:
        raise NotImplementedError

    def score_many(self, problems: list[Problem], answers: list[str | None]) -> list[float]:
        """`score` over a batch (a missing answer is 0); tasks with a costly checker batch it."""
        return [0.0 if a is None else self.score(p, a) for p, a in zip(problems, answers)]

    def drill(self, rng: random.Random, lang: str | None = None) -> str:
        """Plain practice text of true facts (optional): the "lines of correct sums" of the pilot."""
        raise NotImplementedError(f"task {self.name!r} has no drill text")

    def trace(self, problem: Problem, rng: random.Random, style: str | None = None,
              lang: str | None = None, **opts: Any) -> str:
        """A worked completion in the R1-Zero format: <think>…</think> then <answer>…</answer>."""
        return r1_zero_completion(self.worked(problem, rng, style, lang, **opts))

    def worked(self, problem: Problem, rng: random.Random, style: str | None = None,
               lang: str | None = None, **opts: Any) -> Worked:
        style = style or rng.choice(STYLES)
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
        lang = lang or problem.lang
        o = TraceOpts(**opts)
        if o.opening is None:
            o.opening = pick_opening(style, lang, rng)
        return self.work(problem, rng, style, lang, o)

    def problem(self, prompt: str, answer: Any, lang: str, key: str, **data: Any) -> Problem:
        """Build a Problem whose meta lets `task_of` rebuild this task (name + knobs)."""
        meta = {"task": self.name, "knobs": self.knobs, "lang": lang, "key": key, **data}
        return Problem(prompt=prompt, answer=str(answer), meta=meta)

    def direct(self, lang: str, rng: random.Random, opts: TraceOpts, right: str, wrong: str,
               summary_right: str, summary_wrong: str) -> Worked:
        """The direct style: the opening, then an answer that is right with `direct_accuracy`."""
        ok = rng.random() < opts.direct_accuracy
        ans = right if ok else wrong
        end = "。" if any("\u4e00" <= ch <= "\u9fff" for ch in opts.opening) else "."
        summary = (summary_right if ok else summary_wrong) + "\n" + COMMON("boxed", lang, rng, x=ans)
        return Worked(f"{opts.opening} {ans}{end}", ans, summary, ok)


# --- helpers shared by the families ---------------------------------------------------------------
_INT = re.compile(r"^\s*(?:[a-z]\s*=\s*)?([+\-−]?\s*\d[\d,]*)\s*[.。]?\s*$", re.IGNORECASE)


def parse_int(text: str | None) -> int | None:
    """An integer answer: "42", "-7", "x = 12", "1,024", "42." -> int; anything else -> None.

    >>> [parse_int(t) for t in ["42", " -7 ", "x = 12", "1,024", "42.", "4 2", "42 or 43", None]]
    [42, -7, 12, 1024, 42, None, None, None]
    """
    if not text or len(text) > 64:
        return None
    m = _INT.match(text)
    if not m:
        return None
    return int(m.group(1).replace("−", "-").replace(",", "").replace(" ", ""))


def near_miss(value: int, rng: random.Random) -> int:
    """A plausible wrong number near `value` (a slip or a bad guess): off by 1, 2, 10 or 20."""
    return value + rng.choice((-1, 1)) * rng.choice((1, 1, 2, 10, 20))


def fmt_signed(x: int) -> str:
    """A number as the right operand of a product: parenthesised when negative."""
    return f"({x})" if x < 0 else str(x)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None.

    >>> last_boxed("so \\\\boxed{\\\\frac{1}{2}} and \\\\boxed{3}")
    '3'
    >>> last_boxed("\\\\boxed{\\\\frac{1}{2}}"), last_boxed("no box"), last_boxed("\\\\boxed{open")
    ('\\\\frac{1}{2}', None, None)
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None

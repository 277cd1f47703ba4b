"""Rule-based rewards for GRPO: pure functions `(completions, problems) -> list[float]`.

R1-Zero uses rule rewards only, no reward model (spec §8.2): accuracy (the answer checked by
rules) plus format (reasoning inside <think> </think>), equal weight; R1 adds a language
consistency reward against language mixing (R1 §2.3.2). Each reward here is one small pure
function with a doctest, as TRL's `trl/rewards`; `weighted_sum` combines them. Nothing raises on
a bad completion: whatever cannot be extracted scores 0.

Completions. With the R1-Zero template the prompt ends with "Assistant:" and the completion is
everything the model wrote: " <think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>". With the R1 chat
template the generation prompt already ends with "<think>\\n" (nanoseek.tokenizer
GENERATION_PROMPT), so the completion starts *inside* the think block: "…\\n</think>\\n\\nThe
answer is \\boxed{7}.". `format` takes `think_in_prompt=True` for that case (bind it with
functools.partial); `accuracy` and `language_consistency` read both shapes as they are.

Answer extraction (`extract_answer`): look after the last "</think>" when there is one (a
number mentioned while thinking is not the answer), else in the whole text; take the last
<answer>…</answer>, and inside it (or, without one, in the text) the last \\boxed{…}. The
extracted text goes to the problem's own task checker (`nanoseek.tasks.score`), which is also
what evaluation uses, so rewards and evaluation never drift apart.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from nanoseek.tasks import Problem, score_many
from nanoseek.tasks.base import last_boxed

__all__ = ["Reward", "extract_answer", "accuracy", "format", "reasoning_text", "language_consistency",
           "weighted_sum"]

Reward = Callable[[Sequence[str], Sequence[Problem]], list[float]]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]{2,}")  # one-letter tokens are mostly variables ("x", "a")


def _same_length(completions: Sequence[str], problems: Sequence[Problem]) -> None:
    if len(completions) != len(problems):  # a caller's bug, not a bad completion
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems")


def extract_answer(completion: str) -> str | None:
    """The final answer text of a completion, or None.

    >>> extract_answer("<think>\\n2 + 3 = 5\\n</think>\\n<answer>\\n5\\n</answer>")
    '5'
    >>> extract_answer("so</think>\\n\\nThe answer is \\\\boxed{\\\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_answer("<think>maybe <answer>4</answer></think>"), extract_answer("")
    (None, None)
    """
    if not isinstance(completion, str):
        return None
    text = completion.rsplit("</think>", 1)[1] if "</think>" in completion else completion
    tags = _ANSWER.findall(text)
    if tags:
        text = tags[-1]
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    elif not tags:
        return None
    return text.strip() or None


def accuracy(completions: Sequence[str], problems: Sequence[Problem]) -> list[float]:
    """1 when the extracted answer passes the problem's own checker (partial credit if it gives it).

    >>> from nanoseek.tasks import get_task
    >>> import random
    >>> p = get_task("arithmetic").sample(random.Random(0))
    >>> p.prompt, p.answer
    ('What is 63 * 9 - 48 - 84 + 74?', '509')
    >>> accuracy(["<think>\\n...\\n</think>\\n<answer>\\n509\\n</answer>",
    ...           "</think>\\n\\nSo \\\\boxed{509}.", "<answer>\\n510\\n</answer>", "509", ""], [p] * 5)
    [1.0, 1.0, 0.0, 0.0, 0.0]
    """
    _same_length(completions, problems)
    return score_many(list(problems), [extract_answer(c) for c in completions])


_THINK_ANSWER = re.compile(r"\s*<think>(?P<think>.+?)</think>\s*<answer>(?P<ans>.+?)</answer>\s*",
                           re.DOTALL)
_THINK_BOXED = re.compile(r"\s*<think>(?P<think>.+?)</think>(?P<ans>.*?\\boxed\{.+\}.*?)", re.DOTALL)


def format(completions: Sequence[str], problems: Sequence[Problem] | None = None, *,
           think_in_prompt: bool = False) -> list[float]:
    """1 for "<think>reasoning</think>" then one answer block and nothing after, else 0.

    The answer block is <answer>…</answer> (R1-Zero) or a summary holding \\boxed{…} (R1 chat).
    Both parts must be non-blank and the reasoning holds no second <think>. With
    `think_in_prompt=True` the prompt already opened the think block, so the completion must not.

    >>> format([" <think>\\n3 + 4 = 7\\n</think>\\n<answer>\\n7\\n</answer>",
    ...         "<think>\\n3 + 4 = 7\\n</think>\\n<answer>\\n7\\n</answer> more text",
    ...         "<answer>7</answer>", "<think></think><answer>7</answer>"])
    [1.0, 0.0, 0.0, 0.0]
    >>> format(["3 + 4 = 7\\n</think>\\n\\nThe answer is \\\\boxed{7}."], think_in_prompt=True)
    [1.0]
    """
    out = []
    for c in completions:
        if not isinstance(c, str):
            out.append(0.0)
            continue
        text = "<think>" + c if think_in_prompt else c
        m = _THINK_ANSWER.fullmatch(text) or _THINK_BOXED.fullmatch(text)
        ok = bool(m) and m["think"].strip() != "" and m["ans"].strip() != "" \
            and "<think>" not in m["think"] and "<answer>" not in m["think"] \
            and text.count("</think>") == 1 and text.count("<answer>") <= 1
        out.append(float(ok))
    return out


def reasoning_text(completion: str) -> str:
    """The part of a completion before its last </think> (all of it if there is none)."""
    text = completion.rsplit("</think>", 1)[0] if "</think>" in completion else completion
    return text.replace("<think>", "")


def language_consistency(completions: Sequence[str], problems: Sequence[Problem]) -> list[float]:
    """Share of the reasoning's words that are in the prompt's language (R1 §2.3.2).

    Words: a CJK character counts as one Chinese word; a run of two or more Latin letters as one
    English word; digits and symbols are neutral. The prompt's language is `problem.meta["lang"]`
    ("en" or "zh"; guessed from the prompt when missing). Reasoning with no words at all is
    consistent (1.0) unless it is empty (0.0).

    >>> from nanoseek.tasks import Problem
    >>> zh = Problem("计算 2 + 3 等于多少？", "5", {"lang": "zh"})
    >>> language_consistency(["<think>\\n先算 2 + 3 = 5。\\n</think>",
    ...                       "<think>\\nFirst 2 + 3 = 5, 所以是 5\\n</think>",
    ...                       "<think>\\n2 + 3 = 5\\n</think>", ""], [zh] * 4)
    [1.0, 0.75, 1.0, 0.0]
    """
    _same_length(completions, problems)
    out = []
    for c, p in zip(completions, problems):
        text = reasoning_text(c) if isinstance(c, str) else ""
        if not text.strip():
            out.append(0.0)
            continue
        zh, en = len(_CJK.findall(text)), len(_LATIN_WORD.findall(text))
        lang = p.meta.get("lang") or ("zh" if len(_CJK.findall(p.prompt)) > len(
            _LATIN_WORD.findall(p.prompt)) else "en")
        out.append(1.0 if zh + en == 0 else (zh if lang == "zh" else en) / (zh + en))
    return out


def weighted_sum(*terms: tuple[Reward, float]) -> Reward:
    """One reward from weighted ones: weighted_sum((accuracy, 1.0), (format, 1.0)) (R1-Zero's sum).

    >>> r = weighted_sum((format, 1.0), (language_consistency, 0.5))
    >>> from nanoseek.tasks import Problem
    >>> r(["<think>\\nok then\\n</think>\\n<answer>\\n1\\n</answer>"], [Problem("q?", "1", {"lang": "en"})])
    [1.5]
    """
    def reward(completions: Sequence[str], problems: Sequence[Problem]) -> list[float]:
        total = [0.0] * len(completions)
        for fn, w in terms:
            total = [t + w * r for t, r in zip(total, fn(completions, problems))]
        return total
    reward.__name__ = "+".join(f"{w:g}*{getattr(fn, '__name__', 'reward')}" for fn, w in terms)
    return reward

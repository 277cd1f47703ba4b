"""Evaluation metrics over k samples per problem: pass@1, unbiased pass@k, cons@k (majority vote).

R1's protocol (spec §11): no greedy decoding; sample k responses per question at T = 0.6,
top-p 0.95 and report **pass@1 = (1/k) Σ p_i**, the mean correctness of the k samples, averaged
over problems; AIME also gets **cons@64**, the majority vote of 64 samples (R1-Zero: pass@1
15.6 % → 71.0 %, cons@64 86.7 %, spec §8.3). We add the **unbiased pass@k** of Chen et al. 2021
(Codex, eq. 1): with n samples of which c are correct, the chance that a random k-subset holds at
least one correct sample is 1 - C(n-c, k) / C(n, k). All three come from the *same* n samples, so
one generation batch gives every number (pass@j for j ≤ n at no extra cost).

Stability. C(n, k) overflows floats quickly (C(64, 32) ≈ 1.8e18 is fine, C(1024, 512) is not)
and the ratio of two huge binomials loses everything; Chen et al.'s product form
1 - Π_{i=n-c+1..n} (1 - k/i) has only factors in [0, 1] and is exact enough for any n.

Correctness. Scores come from the task's own checker (nanoseek.tasks.score_many, the same call
as the RL accuracy reward) and lie in [0, 1]. `pass_at_1` averages them as they are; the counting
metrics (pass@k, cons@k) count a sample as correct only when it scored 1 (full credit): a
binomial estimator needs a yes/no per sample. Our tasks and math-verify score 0 or 1; some
reasoning-gym checkers pay partial credit, which then counts in pass@1 only.

Answer normalization for the vote (`normalize`): strip, and collapse every whitespace run to one
space. Nothing more (no "0.5" == "1/2", no LaTeX canonicalization), on purpose: the *checker*
decides correctness, the vote only groups identical strings. Math equivalence inside the vote
would need a second, possibly different, notion of "same answer" than the checker's (math-verify
for files, integer parsing for our tasks, reasoning-gym's own for gym), and a vote that groups
differently from how the checker scores is exactly the drift STYLE.md §5 forbids. Cost: two
spellings of one value split their votes; with our integer tasks that is rare. A sample with no
extractable answer (None) never votes; ties go to the tied answer seen first in sample order, so
the vote is deterministic. All functions are pure and torch-free.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

__all__ = ["pass_at_k", "pass_at_1", "mean_pass_at_k", "num_correct", "normalize", "majority_vote",
           "cons_at_k", "pass_k_ladder", "step_accuracy"]

_WS = re.compile(r"\s+")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), product form.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), pass_at_k(4, 0, 4), pass_at_k(4, 3, 2)
    (0.25, 0.5, 0.0, 1.0)
    >>> round(pass_at_k(64, 1, 16), 6)   # 16/64: one correct sample lies in a random 16-subset
    0.25
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def num_correct(scores: Sequence[float]) -> int:
    """Samples with full credit (score 1).

    >>> num_correct([1.0, 0.0, 0.5, 1])
    2
    """
    return sum(1 for s in scores if s >= 1.0)


def pass_at_1(correct: Sequence[Sequence[float]]) -> float:
    """R1's pass@1: the mean over problems of the mean score of its samples.

    >>> pass_at_1([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0.5]])   # (0.5 + 0 + 0.875) / 3
    0.4583333333333333
    """
    if not correct:
        return 0.0
    return sum(sum(s) / len(s) for s in correct) / len(correct)


def mean_pass_at_k(correct: Sequence[Sequence[float]], k: int) -> float:
    """Unbiased pass@k averaged over problems (a sample counts when it scored 1).

    >>> mean_pass_at_k([[1, 0, 0, 0], [0, 0, 0, 0]], 2)   # (0.5 + 0) / 2
    0.25
    """
    if not correct:
        return 0.0
    return sum(pass_at_k(len(s), num_correct(s), k) for s in correct) / len(correct)


def pass_k_ladder(k: int) -> list[int]:
    """The pass@j reported for k samples: 1, 2, 4, … up to k, and k itself.

    >>> pass_k_ladder(16), pass_k_ladder(6), pass_k_ladder(1)
    ([1, 2, 4, 8, 16], [1, 2, 4, 6], [1])
    """
    ladder, j = [], 1
    while j < k:
        ladder.append(j)
        j *= 2
    return ladder + [k]


def normalize(answer: str | None) -> str | None:
    """The form answers are grouped by for the vote: stripped, whitespace runs as one space.

    >>> normalize("  x =\\n 12 "), normalize("   "), normalize(None)
    ('x = 12', None, None)
    """
    if answer is None:
        return None
    text = _WS.sub(" ", answer).strip()
    return text or None


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent normalized answer; None answers never vote; a tie goes to the tied
    answer that appears first in sample order. None when no sample has an answer.

    >>> majority_vote(["7", None, " 8", "8 ", "7"]), majority_vote(["7", "8"]), majority_vote([None])
    ('7', '7', None)
    >>> majority_vote([None, None, "5", "6", "6"])
    '6'
    """
    votes = [a for a in map(normalize, answers) if a is not None]
    if not votes:
        return None
    counts = Counter(votes)  # insertion order = first appearance, and max() keeps the first maximum
    return max(counts, key=counts.__getitem__)


def cons_at_k(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[float]]) -> float:
    """Share of problems whose majority-voted answer is correct, i.e. some sample giving that
    (normalized) answer scored 1. A problem with no answers at all counts as wrong.

    >>> cons_at_k([["7", "7", "8"], ["1", "2", None, None], [None, None]],
    ...           [[1, 1, 0], [0, 1, 0, 0], [0, 0]])   # 7 right; the 1/2 tie goes to "1", wrong
    0.3333333333333333
    """
    if not answers:
        return 0.0
    hits = 0
    for ans, scores in zip(answers, correct, strict=True):
        voted = majority_vote(ans)
        hits += voted is not None and any(normalize(a) == voted and s >= 1.0 for a, s in zip(ans, scores))
    return hits / len(answers)


_STEP = re.compile(r"(?<![\d.])(-?\d+) ([-+*]) (-?\d+) = (-?\d+)(?!\d|\.\d)")


def step_accuracy(texts: Sequence[str]) -> tuple[int, int]:
    """(right, written): the integer steps "a op b = c" written in the texts and how many are right.
    What the base model can *carry out* (a diagnostic before RL: RL can only select ways of
    answering the model already executes; the issue measured `12 * 7 = 85` in the tiny base).

    >>> step_accuracy(["Then 3 + 4 = 7.", "Multiply: 6 * 7 = 41. Then -1 - 2 = -3."])
    (2, 3)
    """
    right = written = 0
    for text in texts:
        for a, op, b, c in _STEP.findall(text or ""):
            a, b, c = int(a), int(b), int(c)
            right += (a + b if op == "+" else a - b if op == "-" else a * b) == c
            written += 1
    return right, written


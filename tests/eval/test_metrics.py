"""Metrics against brute force and hand-computed cases: pass@k, pass@1, majority vote, cons@k."""
from __future__ import annotations

import itertools
import math

import pytest

from nanoseek.eval.metrics import (cons_at_k, majority_vote, mean_pass_at_k, normalize, pass_at_1, pass_at_k,
                                   pass_k_ladder)


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow():
    n, c, k = 2048, 3, 1000
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)      # Python ints: exact, then one division
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(n, 1, 1) == pytest.approx(1 / n)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_at_1_is_the_mean_of_sample_means_and_pass_at_k_counts_full_credit():
    correct = [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0.5, 0.5, 1, 0]]
    assert pass_at_1(correct) == pytest.approx((0.5 + 0 + 1 + 0.5) / 4)
    binary = [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert mean_pass_at_k(binary, 1) == pytest.approx(pass_at_1(binary))
    assert mean_pass_at_k(binary, 2) == pytest.approx((5 / 6 + 0 + 1) / 3)     # 1 - C(2,2)/C(4,2)
    assert mean_pass_at_k([[0.5, 0.5]], 2) == 0.0                            # partial credit is not a pass
    assert pass_at_1([]) == mean_pass_at_k([], 4) == cons_at_k([], []) == 0.0
    assert pass_k_ladder(64) == [1, 2, 4, 8, 16, 32, 64] and pass_k_ladder(12) == [1, 2, 4, 8, 12]


def test_majority_vote_normalizes_skips_none_and_breaks_ties_by_first_appearance():
    assert normalize(" 1,\n  024 ") == "1, 024"
    assert majority_vote([" 12", "12 ", "13", "13", None, None, None]) == "12"   # tie: "12" came first
    assert majority_vote([None, "13", "12", "12"]) == "12"
    assert majority_vote(["x =  3", "x = 3", "3"]) == "x = 3"                     # whitespace only
    assert majority_vote(["0.5", "1/2"]) == "0.5"                                  # no math equivalence
    assert majority_vote([None, "  ", None]) is None


def test_cons_at_k_hand_cases():
    answers = [["5", "5", "6", None],          # vote 5, right
               ["6", "5", None, None],         # tie: 6 first, wrong
               [None, None, None, None],       # nothing to vote: wrong
               ["7", " 7", "8", "8 "],         # tie after normalizing: 7 first; right
               ["9", "9", "9", "4"]]           # vote 9, wrong though a sample was right
    correct = [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]]
    assert cons_at_k(answers, correct) == pytest.approx(2 / 5)
    assert cons_at_k([["7", "7"]], [[0.5, 0.5]]) == 0.0                          # partial credit never counts

"""load_problems: held-out task problems, corpus problems files, GSM8K/MATH files, reasoning-gym."""
from __future__ import annotations

import json
import pathlib

import pytest

from nanoseek.data.corpus import build, scaled, tiny
from nanoseek.eval.problems import HELDOUT, is_corpus_file, load_problems
from nanoseek.tasks import score_many, split_of

MATH_SAMPLE = str(pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "math_sample.jsonl")


@pytest.mark.parametrize("name", ["arithmetic", "linear", "countdown"])
def test_task_names_give_distinct_held_out_problems(name):
    problems = load_problems(name, 30, seed=0)
    assert len(problems) == 30 and all(p.task == name for p in problems)
    assert all(split_of(p, 0, HELDOUT) == "heldout" for p in problems)
    assert len({p.meta["key"] for p in problems}) == 30
    assert [p.prompt for p in load_problems(name, 30, seed=0)] == [p.prompt for p in problems]
    assert score_many(problems, [p.answer for p in problems]) == [1.0] * 30   # the task's checker


def test_heldout_share_is_the_corpus_one():
    assert HELDOUT == tiny().heldout == 0.05


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    build(scaled(tiny(), 0.02), out, seed=0)
    return out


def test_corpus_problems_file(corpus):
    path = str(corpus / "problems" / "eval.jsonl")
    lines = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert is_corpus_file(path) and len(lines) >= 6
    problems = load_problems(None, 5, data=path)
    assert [p.prompt for p in problems] == [rec["prompt"] for rec in lines[:5]]
    assert all(split_of(p, 0, HELDOUT) == "heldout" for p in problems)     # the corpus's split is ours
    assert [p.prompt for p in load_problems(path, 0)] == [rec["prompt"] for rec in lines]
    arithmetic = load_problems("arithmetic", 0, data=path)
    assert arithmetic and all(p.task == "arithmetic" for p in arithmetic)
    assert len(arithmetic) == sum(rec["meta"]["task"] == "arithmetic" for rec in lines)


def test_math_benchmark_file():
    assert not is_corpus_file(MATH_SAMPLE)
    problems = load_problems(None, 0, data=MATH_SAMPLE)
    records = [line for line in open(MATH_SAMPLE, encoding="utf-8") if line.strip()]
    assert len(problems) == len(records) and all(p.task == "math" for p in problems)
    assert problems[0].answer == "66" and problems[2].answer == "\\frac{1}{2}"      # GSM8K, MATH layouts
    assert "\\boxed{}" in problems[0].prompt                                         # R1's instruction
    assert [p.prompt for p in load_problems(MATH_SAMPLE, 2)] == [p.prompt for p in problems[:2]]


def test_reasoning_gym_entries():
    problems = load_problems("gym:chain_sum", 3, seed=0)
    assert len(problems) == 3 and all(p.task == "gym" for p in problems)
    assert len({p.prompt for p in problems}) == 3
    assert score_many(problems, [p.answer for p in problems]) == [1.0] * 3


def test_nothing_to_load_is_an_error():
    with pytest.raises(ValueError):
        load_problems(None, 4)

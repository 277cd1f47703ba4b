"""Rewards: doctests, format in both template shapes, extraction never raises, language mixing."""
import doctest
import functools
import random

import pytest

import nanoseek.rl.rewards
from nanoseek.rl.rewards import accuracy, extract_answer, format, language_consistency, weighted_sum
from nanoseek.tasks import STYLES, Problem, get_task
from nanoseek.tokenizer import Tokenizer

EN = Problem("What is 2 + 3?", "5", {"lang": "en"})
ZH = Problem("计算 2 + 3 等于多少？", "5", {"lang": "zh"})


def test_doctests():
    # every reward has a doctest (STYLE 4) and they pass; pytest also collects them under nanoseek/
    result = doctest.testmod(nanoseek.rl.rewards)
    assert result.failed == 0 and result.attempted >= 5


def test_format_r1_zero():
    good = "<think>\nreason\n</think>\n<answer>\n5\n</answer>"
    cases = {
        good: 1.0, " " + good + "\n": 1.0,
        good + " and more": 0.0, good + "<answer>6</answer>": 0.0,
        "<think>\nreason\n</think>": 0.0, "<answer>5</answer>": 0.0,
        "<think>\n \n</think>\n<answer>\n5\n</answer>": 0.0,  # blank reasoning
        "<think>\nreason\n</think>\n<answer>\n \n</answer>": 0.0,  # blank answer
        "<think><think>\nreason\n</think>\n<answer>\n5\n</answer>": 0.0,
        "<think>\na</think>\nb</think>\n<answer>\n5\n</answer>": 0.0,
        "reason\n</think>\n<answer>\n5\n</answer>": 0.0,  # R1-Zero: the model must open <think>
        "": 0.0,
    }
    assert format(list(cases)) == list(cases.values())


def test_format_chat_template_completions():
    """With the R1 chat template the prompt ends in "<think>\\n": the completion starts inside it."""
    fmt = functools.partial(format, think_in_prompt=True)
    assert fmt(["3 + 4 = 7\n</think>\n\nThe answer is \\boxed{7}."]) == [1.0]
    assert fmt(["3 + 4 = 7\n</think>\n<answer>\n7\n</answer>"]) == [1.0]
    assert fmt(["<think>\n3 + 4 = 7\n</think>\n\n\\boxed{7}"]) == [0.0]  # a second <think>
    assert fmt(["3 + 4 = 7\n</think>\n\nseven"]) == [0.0]  # no answer block
    assert fmt(["3 + 4 = 7 \\boxed{7}"]) == [0.0]  # never closed
    assert format(["3 + 4 = 7\n</think>\n\n\\boxed{7}"]) == [0.0]  # without the flag it must open


def test_task_traces_have_format_and_accuracy():
    """R1-Zero traces and chat completions made from every task's traces pass format."""
    tok_fmt = functools.partial(format, think_in_prompt=True)
    for name in ("arithmetic", "countdown", "linear"):
        task, rng = get_task(name), random.Random(0)
        for _ in range(20):
            p = task.sample(rng, lang=rng.choice(["en", "zh"]))
            for style in STYLES:
                w = task.worked(p, rng, style)
                content = f"<think>\n{w.thinking}\n</think>\n\n{w.summary}"
                chat = Tokenizer.completion_text(content)  # what the model generates after the prompt
                assert format([task.trace(p, random.Random(1), style)]) == [1.0]
                assert tok_fmt([chat]) == [1.0], chat
                assert accuracy([chat], [p]) == [float(w.correct)]


def test_extraction_never_raises():
    weird = ["", " ", "<answer>", "</answer><answer>", "\\boxed{", "\\boxed{}", "}{", "</think>" * 3,
             "<think>" + "x" * 200_000, "\\boxed{" * 1000, "<answer>\n\n</answer>", "\x00\udcff", "答案"]
    problems = [get_task("arithmetic").sample(random.Random(i)) for i in range(len(weird))]
    assert accuracy(weird, problems) == [0.0] * len(weird)
    assert all(isinstance(x, float) for x in format(weird) + language_consistency(weird, problems))
    assert extract_answer(None) is None
    with pytest.raises(ValueError):  # a caller's bug is not a bad completion
        accuracy(["<answer>1</answer>"], problems)


def test_extraction_order():
    assert extract_answer("<answer>1</answer> <answer>2</answer>") == "2"
    assert extract_answer("<think>\\boxed{1}</think>\n\\boxed{2}") == "2"
    assert extract_answer("<answer>so \\boxed{3}</answer>") == "3"
    assert extract_answer("<think>\n\\boxed{1}\n</think>\nno answer here") is None
    assert extract_answer("The answer is \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"


def test_language_consistency():
    en_think, zh_think = "<think>\nFirst add them: 2 + 3 = 5.\n</think>", "<think>\n先算 2 + 3 = 5。\n</think>"
    assert language_consistency([en_think, zh_think], [EN, EN]) == [1.0, 0.0]
    assert language_consistency([en_think, zh_think], [ZH, ZH]) == [0.0, 1.0]
    # without meta["lang"] the prompt's language is guessed
    assert language_consistency([zh_think], [Problem(ZH.prompt, "5")]) == [1.0]
    # mixed traces fall in between, and only the reasoning counts (not the answer after </think>)
    task, rng = get_task("arithmetic", lang="zh"), random.Random(0)
    p = task.sample(rng)
    mixed = [task.trace(p, rng, "check", "mix", verify=1.0) for _ in range(30)]
    scores = language_consistency(mixed, [p] * 30)
    assert 0.2 < sum(scores) / 30 < 0.8
    assert language_consistency(["<think>\n先算。\n</think>\nThe answer is five"], [ZH]) == [1.0]


def test_weighted_sum():
    r = weighted_sum((accuracy, 1.0), (format, 1.0), (language_consistency, 0.5))
    p = get_task("arithmetic").sample(random.Random(0))
    good = f"<think>\nAdd them up.\n</think>\n<answer>\n{p.answer}\n</answer>"
    # a bare answer has no think block: no format, and its "reasoning" has no words (consistent)
    assert r([good, f"\\boxed{{{p.answer}}}", "五", ""], [p] * 4) == [2.5, 1.5, 0.0, 0.0]
    assert accuracy([good], [EN]) == [0.0]  # a problem without a task cannot be checked: 0, no error
    assert "accuracy" in r.__name__

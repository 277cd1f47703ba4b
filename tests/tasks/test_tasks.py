"""Tasks: traces score as their style says, generators are deterministic, splits are disjoint,
reasoning-gym adapters, JSONL math benchmarks scored by math-verify (also from a worker thread)."""
import doctest
import json
import pickle
import random
import threading
import time
from pathlib import Path

import pytest

import nanoseek.tasks.base
from nanoseek.rl.rewards import accuracy, extract_answer
from nanoseek.tasks import (LANGS, REFLECT_MARKERS, STYLES, Problem, get_task, sample_split, score,
                            split_of, task_of)
from nanoseek.tasks.countdown import Countdown

FAMILIES = ["arithmetic", "countdown", "linear"]
DATA = Path(__file__).parents[1] / "fixtures" / "math_sample.jsonl"


def test_base_doctests():
    assert doctest.testmod(nanoseek.tasks.base).failed == 0


@pytest.mark.parametrize("name", FAMILIES + ["arithmetic-running"])
def test_traces_score_as_their_style(name):
    task = get_task("arithmetic", running=True) if name == "arithmetic-running" else get_task(name)
    for seed in range(60):
        rng = random.Random(seed)
        for lang in LANGS + ("mix",):
            p = task.sample(rng, lang="zh" if lang == "zh" else "en")
            for style in STYLES:
                w = task.worked(p, rng, style, lang, verify=0.5)
                got = accuracy([task.trace(p, random.Random(seed), style, lang)], [p])[0]
                chat = score(p, extract_answer("</think>\n\n" + w.summary))
                assert score(p, w.answer) == chat == float(w.correct), (style, lang, w)
                if style in ("steps", "check"):
                    assert got == 1.0 and w.correct, (style, w.thinking)
                if style == "mistake":
                    assert got == 0.0 and not w.correct, w.thinking
                assert any(m in w.thinking for m in REFLECT_MARKERS) == (style == "check")
                if style == "direct":
                    assert w.thinking.count("\n") == 0  # no steps


@pytest.mark.parametrize("name", FAMILIES)
def test_direct_accuracy_and_openings(name):
    task, rng = get_task(name), random.Random(0)
    ws = [task.worked(task.sample(rng), rng, "direct", direct_accuracy=0.2, opening="Guess:")
          for _ in range(400)]
    assert 0.1 < sum(w.correct for w in ws) / len(ws) < 0.3
    assert all(w.thinking.startswith("Guess: ") for w in ws)
    w = task.worked(task.sample(rng), rng, "steps", opening="Hmm.")
    assert w.thinking.startswith("Hmm.\n")


@pytest.mark.parametrize("name", FAMILIES)
def test_deterministic_per_seed(name):
    def draw(seed):
        task, rng = get_task(name), random.Random(seed)
        out = []
        for _ in range(20):
            p = task.sample(rng, lang=rng.choice(LANGS))
            out.append((p.prompt, p.answer, task.trace(p, rng)))
        return out
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


@pytest.mark.parametrize("name", FAMILIES)
def test_train_and_heldout_disjoint(name):
    task, rng = get_task(name), random.Random(0)
    train = {sample_split(task, rng, "train", 7, 0.1).meta["key"] for _ in range(1500)}
    held = {sample_split(task, rng, "heldout", 7, 0.1).meta["key"] for _ in range(150)}
    assert train and held and not (train & held)
    # both wordings of a problem share a split; another seed gives another split
    p_en = task.sample(random.Random(3), lang="en")
    p_zh = task.sample(random.Random(3), lang="zh")
    assert p_en.prompt != p_zh.prompt and p_en.meta["key"] == p_zh.meta["key"]
    assert all(split_of(p_en, s, 0.5) == split_of(p_zh, s, 0.5) for s in range(20))
    assert len({split_of(p_en, s, 0.5) for s in range(20)}) == 2


@pytest.mark.parametrize("name", FAMILIES)
def test_problem_survives_pickle_and_json(name):
    task = get_task(name, lang="zh")
    p = task.sample(random.Random(5))
    for q in (pickle.loads(pickle.dumps(p)), Problem.from_dict(json.loads(json.dumps(p.to_dict())))):
        assert q == p and q.lang == "zh"
        assert task_of(q).score(q, p.answer) == 1.0


def test_difficulty_knobs():
    rng = random.Random(0)
    hard = get_task("arithmetic", steps=(6, 6), digits=3, mul=0.5)
    p = hard.sample(rng)
    assert len(p.meta["ops"]) == 6 and all(len(str(n)) == 3 for n, op in zip(p.meta["nums"][1:], p.meta["ops"])
                                          if op != "*")
    easy = get_task("arithmetic", steps=(1, 1), digits=1, mul=0.0)
    assert all(len(easy.sample(rng).meta["ops"]) == 1 for _ in range(10))


def test_running_form_rewrites_what_is_left():
    """The running form: every line is one true operation on the first (or the product's) operands
    of what the line above left, and what it leaves evaluates to the answer (slips aside)."""
    from nanoseek.tasks.arithmetic import evaluate
    task = get_task("arithmetic", steps=(2, 5), digits=1, mul=0.3, running=True)
    assert task.knobs["running"] is True and "running" not in get_task("arithmetic").knobs
    rng = random.Random(0)
    for _ in range(200):
        p = task.sample(rng, lang="en")
        nums, ops = list(p.meta["nums"]), list(p.meta["ops"])
        w = task.worked(p, rng, "steps", "en")
        lines = w.thinking.split("\n")
        assert lines[1] == f"We compute {p.prompt[len('What is '):-1]}."
        for line in lines[2:-1]:
            head, _, left = line.rstrip(".").partition(", leaving ")
            a, op, b, _, c = head.split(" ")
            k = ops.index("*") if "*" in ops else 0
            assert (int(a), op, int(b)) == (nums[k], ops[k], nums[k + 1]), (line, nums, ops)
            nums[k:k + 2], ops[k:k + 1] = [int(c)], []
            assert int(c) == evaluate([int(a), int(b)], [op])
            if ops:
                parts = left.split(" ")
                assert [int(x) for x in parts[::2]] == nums and parts[1::2] == ops
                assert evaluate(nums, ops) == int(p.answer)
        assert not ops and nums == [int(p.answer)] and w.correct
    # a caught slip is corrected inside its line, and what is left carries the corrected value
    w = next(w for w in (task.worked(task.sample(rng, lang="en"), rng, "check", "en", verify=1.0)
                         for _ in range(50)) if "Check: " in w.thinking)
    assert w.correct and "Wait, let me check: " in w.thinking and ". Good" in w.thinking


def test_countdown_checker():
    p = Countdown().sample(random.Random(0))
    nums, t = p.meta["numbers"], p.meta["target"]
    assert Countdown().score(p, p.answer) == 1.0
    assert Countdown().score(p, f"{p.answer} = {t}") == 1.0
    assert Countdown().score(p, p.answer.replace("*", "×")) == 1.0
    assert Countdown().score(p, f"({p.answer}) * 1") == float(nums.count(1) > p.answer.split().count("1"))
    for bad in ["", "garbage", "__import__('os')", "2 ** 100", f"{t}", "1 / 0", "(" * 300]:
        assert Countdown().score(p, bad) == 0.0
    q = Countdown().sample(random.Random(1))
    q.meta.update(numbers=[2, 3, 5], target=25)
    assert [Countdown().score(q, a) for a in ["(2 + 3) * 5", "5 * (3 + 2)", "5 * 5", "25"]] == [1, 1, 0, 0]


def test_unknown_task_and_style():
    with pytest.raises(KeyError):
        get_task("nope")
    task = get_task("arithmetic")
    with pytest.raises(ValueError):
        task.trace(task.sample(random.Random(0)), random.Random(0), style="sloppy")


# --- reasoning-gym --------------------------------------------------------------------------------
GYM = ["chain_sum", "basic_arithmetic", "leg_counting", "word_sorting"]


@pytest.mark.parametrize("dataset", GYM)
def test_reasoning_gym_adapter(dataset):
    pytest.importorskip("reasoning_gym", reason="reasoning-gym is not installed")
    task = get_task(f"gym:{dataset}", size=1000)
    p = task.sample(random.Random(0))
    assert p.prompt and p.answer and p.meta["task"] == "gym"
    assert task.sample(random.Random(0)).prompt == p.prompt  # deterministic
    right = f"<think>\nsolved\n</think>\n<answer>\n{p.answer}\n</answer>"
    wrong = "<think>\nsolved\n</think>\n<answer>\nno idea\n</answer>"
    assert accuracy([right, wrong, ""], [p] * 3) == [1.0, 0.0, 0.0]
    q = pickle.loads(pickle.dumps(p))  # the entry travels with the problem
    assert score(q, p.answer) == 1.0
    with pytest.raises(NotImplementedError):
        task.trace(p, random.Random(0))


# --- JSONL math benchmarks (math-verify in a spawn process pool) ------------------------------------
def test_math_jsonl_layouts():
    task = get_task("math", path=str(DATA))
    got = [(p.answer, p.meta["index"]) for p in task.problems]
    assert [a for a, _ in got] == ["66", "2500", "\\frac{1}{2}", "2\\sqrt{2}", "\\{2, 3\\}", "249", "30", "1024"]
    p = task.problems[0]
    assert p.prompt.endswith("within \\boxed{}.") and "<<" not in p.meta["solution"]
    assert task.sample(random.Random(0)) in task.problems


MATH_CASES = [  # (gold, prediction, expected)
    ("\\frac{1}{2}", "0.5", 1.0), ("\\frac{1}{2}", "\\boxed{0.5}", 1.0), ("0.5", "\\frac{1}{2}", 1.0),
    ("2\\sqrt{2}", "\\sqrt{8}", 1.0), ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0), ("\\{2, 3\\}", "\\{3, 2\\}", 1.0),
    ("72", "72", 1.0), ("2500", "2,500", 1.0), ("\\frac{1}{2}", "0.25", 0.0), ("2\\sqrt{2}", "\\sqrt{2}*3", 0.0),
    ("72", "71", 0.0), ("72", "asdf $$ {{ \\boxed{", 0.0), ("72", "", 0.0), ("72", None, 0.0),
    ("72", "1+" * 50_000 + "1", 0.0), ("72", "\\boxed{" + "(" * 40 + "}", 0.0),
    ("72", "x" * 100_000 + "\\boxed{72}", 1.0),  # very long: only the tail is parsed
]


def _check_math_cases():
    from nanoseek.tasks.math_jsonl import verify_many
    return verify_many([(g, p) for g, p, _ in MATH_CASES])


def test_math_verify_cases_main_thread():
    assert _check_math_cases() == [e for *_, e in MATH_CASES]


def test_math_verify_from_worker_thread():
    """math-verify's own parse raises in a non-main thread; through the pool it works and times out."""
    result, errors = {}, []

    def work():
        try:
            from nanoseek.tasks.math_jsonl import verify
            result["cases"] = _check_math_cases()
            slow = "\\boxed{" + "+".join(f"\\frac{{{i}}}{{{i + 1}}}x^{{{i}}}" for i in range(90)) + "}"
            t = time.perf_counter()
            result["slow"] = verify("x^2", slow, timeout_s=1)
            result["slow_s"] = time.perf_counter() - t
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)
    th = threading.Thread(target=work)
    th.start()
    th.join(120)
    assert not errors and result["cases"] == [e for *_, e in MATH_CASES]
    assert result["slow"] == 0.0 and result["slow_s"] < 30


def test_math_task_through_rewards():
    task = get_task("math", path=str(DATA))
    half, root = task.problems[2], task.problems[3]
    comps = ["<think>\n3/4 - 1/4\n</think>\n<answer>\n0.5\n</answer>",
             "<think>\nhm\n</think>\n\nSo the answer is \\boxed{\\frac{2}{4}}.",
             "<think>\nhm\n</think>\n<answer>\n\\sqrt{8}\n</answer>", "<answer>\n3\n</answer>", "garbage"]
    assert accuracy(comps, [half, half, root, root, root]) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert task.trace(half, random.Random(0), style="steps").endswith("\\frac{1}{2}\n</answer>")

"""evaluate() end to end: canned completions give hand-computed metrics; a tiny random model gives
k samples per problem, the same samples whatever shares the batch; the CLI prints one JSON object."""
from __future__ import annotations

import json

import pytest

from nanoseek import save_pretrained
from nanoseek.engine import LLM, Completion
from nanoseek.eval.evaluate import EvalConfig, evaluate, problem_seed, prompts_for
from nanoseek.eval.problems import load_problems
from nanoseek.tasks import Problem
from nanoseek.tokenizer import GENERATION_PROMPT, r1_zero_prompt, train_tokenizer
from tests.engine.test_engine import _model, _v3

TEXTS = [r1_zero_prompt("What is 12 + 34 * 5?")
         + " <think>\n12 + 34 = 46\n</think>\n<answer>\n46\n</answer>",
         "<｜begin▁of▁sentence｜><｜User｜>What is 3 - 1?<｜Assistant｜><think>\n3 - 1 = 2\n</think>\n\n\\boxed{2}"] * 20
CFG = EvalConfig(k=3, max_tokens=6, seed=0)


class CannedLLM:
    """Stands in for the engine: per prompt, the given completion texts (in order)."""
    tokenizer = None

    def __init__(self, texts: list[list[str]]):
        self.texts, self.calls = texts, []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        return [[Completion(i, t, [0] * (len(t) // 2), "stop") for i, t in enumerate(ts)] for ts in self.texts]


def test_canned_completions_give_hand_computed_metrics():
    problems = [Problem("What is 2 + 3?", "5", {"task": "arithmetic"}),
                Problem("What is 4 + 4?", "8", {"task": "arithmetic"})]
    texts = [[" <think>\nok\n</think>\n<answer>\n5\n</answer>", "<answer>6</answer>", "<answer>6</answer>", "x"],
             ["so</think>\n\n\\boxed{8}", "<answer>7</answer>", "<answer> 7</answer>", "<answer>8</answer>"]]
    llm = CannedLLM(texts)
    r = evaluate(llm, problems, EvalConfig(k=4), with_records=True)
    assert r["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert r["pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)
    assert r["pass@4"] == 1.0 and r["cons@4"] == 0.5            # votes: 6 (wrong); 8 vs 7 tie -> 8, seen first
    assert r["answered"] == pytest.approx(7 / 8) and r["n_problems"] == 2 and r["k"] == 4
    assert [rec["voted"] for rec in r["records"]] == ["6", "8"]
    assert r["records"][0]["scores"] == [1.0, 0.0, 0.0, 0.0]
    prompts, params = llm.calls[0]
    assert prompts == [r1_zero_prompt(p.prompt) for p in problems]
    assert [(sp.n, sp.temperature, sp.top_p) for sp in params] == [(4, 0.6, 0.95)] * 2
    assert [sp.seed for sp in params] == [problem_seed(0, p) for p in problems]
    assert "records" not in evaluate(CannedLLM(texts), problems, EvalConfig(k=4))


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    path = str(tmp_path_factory.mktemp("ck") / "v3")
    save_pretrained(_model(_v3(vocab_size=tok.vocab_size)), path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, num_blocks=256, block_size=16)


@pytest.fixture(scope="module")
def problems():
    return load_problems("arithmetic", 5)


def _samples(result):
    return [(r["prompt"], r["texts"], r["lengths"], r["scores"]) for r in result["records"]]


def test_tiny_model_k_samples_metrics_in_range(llm, problems):
    r = evaluate(llm, problems, CFG, with_records=True)
    assert r["n_problems"] == 5 and r["k"] == 3
    assert all(len(rec["texts"]) == len(rec["scores"]) == len(rec["answers"]) == 3 for rec in r["records"])
    assert all(0 < n <= CFG.max_tokens for rec in r["records"] for n in rec["lengths"])
    metrics = {k: v for k, v in r.items() if k.startswith(("pass@", "cons@")) or k in ("answered", "truncated")}
    assert set(metrics) >= {"pass@1", "pass@2", "pass@3", "cons@3", "answered", "truncated"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert r["pass@1"] <= r["pass@2"] <= r["pass@3"]
    assert r["mean_length"] > 0 and r["median_length"] > 0
    assert len({t for rec in r["records"] for t in rec["texts"]}) > 1     # it samples
    json.dumps(r)


def test_same_seed_same_samples_whatever_shares_the_batch(llm, model_dir, problems):
    full = _samples(evaluate(llm, problems, CFG, with_records=True))
    again = _samples(evaluate(LLM(model_dir, num_blocks=256, block_size=16), problems, CFG, with_records=True))
    assert full == again
    subset = [problems[3], problems[1]]                                  # fewer, reordered
    assert _samples(evaluate(llm, subset, CFG, with_records=True)) == [full[3], full[1]]
    other = _samples(evaluate(llm, problems, EvalConfig(k=3, max_tokens=6, seed=1), with_records=True))
    assert other != full


def test_chat_template_prompts(llm, problems):
    ids = prompts_for(problems[:1], "chat", llm.tokenizer)[0]
    assert llm.tokenizer.decode(ids).endswith(problems[0].prompt + GENERATION_PROMPT)
    r = evaluate(llm, problems[:2], EvalConfig(k=2, max_tokens=4, template="chat"))
    assert r["n_problems"] == 2 and 0.0 <= r["pass@1"] <= r["pass@2"] <= 1.0
    with pytest.raises(ValueError):
        prompts_for(problems, "chat", None)
    with pytest.raises(ValueError):
        EvalConfig(template="greedy")


def test_cli_eval_json_and_records(model_dir, tmp_path, capsys):
    from nanoseek.cli import build_parser
    from nanoseek.stages import eval as eval_stage
    parser = build_parser({"eval": ("nanoseek.stages.eval", "evaluate a checkpoint")})
    records = tmp_path / "records.jsonl"
    args = parser.parse_args(["eval", "--model", model_dir, "--task", "arithmetic", "--k", "2", "--n-problems", "3",
                              "--max-tokens", "5", "--json", "--records", str(records)])
    assert eval_stage.main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert {"pass@1", "pass@2", "cons@2", "answered", "mean_length", "median_length", "n_problems", "k",
            "config", "model", "task", "seconds"} <= result.keys()
    assert result["n_problems"] == 3 and result["k"] == 2 and result["config"]["max_tokens"] == 5
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) == 3 and all(len(rec["texts"]) == 2 for rec in lines)
    args = parser.parse_args(["eval", "--model", model_dir, "--task", "linear", "--k", "2", "--n-problems", "2",
                              "--max-tokens", "3"])
    assert eval_stage.main(args) == 0
    table = capsys.readouterr().out
    assert "2 problems x 2 samples" in table and "pass@1" in table and "cons@2" in table


def test_cli_eval_benches_in_one_process_match_single_runs_and_skip_done(model_dir, tmp_path, capsys):
    from nanoseek.cli import build_parser
    from nanoseek.stages import eval as eval_stage
    parser = build_parser({"eval": ("nanoseek.stages.eval", "evaluate a checkpoint")})
    shared = ["eval", "--model", model_dir, "--k", "2", "--max-tokens", "4", "--n-problems", "3"]
    out = tmp_path / "ev"
    args = parser.parse_args([*shared, "--out-dir", str(out), "--bench", "m.a=--task arithmetic",
                              "--bench", "m.l=--task linear --n-problems 2 --k 3 --max-tokens 5"])
    assert eval_stage.main(args) == 0
    capsys.readouterr()
    a, lin = (json.loads((out / f"m.{n}.json").read_text()) for n in ("a", "l"))
    assert (a["n_problems"], a["k"], a["config"]["max_tokens"], a["task"]) == (3, 2, 4, "arithmetic")
    assert (lin["n_problems"], lin["k"], lin["config"]["max_tokens"], lin["task"]) == (2, 3, 5, "linear")
    assert len((out / "m.l.records.jsonl").read_text().splitlines()) == 2
    # the same numbers as one benchmark a process (seeded samples)
    args = parser.parse_args(["eval", "--model", model_dir, "--task", "linear", "--n-problems", "2", "--k", "3",
                              "--max-tokens", "5", "--json"])
    assert eval_stage.main(args) == 0
    single = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in single.items() if k != "seconds"} == {k: v for k, v in lin.items() if k != "seconds"}
    # rerun: complete benchmarks are skipped (files untouched); a removed one is redone
    stamp = (out / "m.a.json").stat().st_mtime_ns
    (out / "m.l.json").unlink()
    assert eval_stage.main(parser.parse_args([*shared, "--out-dir", str(out), "--bench", "m.a=--task arithmetic",
                                              "--bench", "m.l=--task linear --n-problems 2"])) == 0
    assert (out / "m.a.json").stat().st_mtime_ns == stamp and (out / "m.l.json").exists()
    assert "m.a: complete, skipped" in capsys.readouterr().err
    # malformed: clear messages, exit 2
    for bench, msg in ((["--bench", "noequals"], "NAME=FLAGS"), (["--bench", "x=--model y --task linear"], "shared"),
                       (["--bench", "x=--task linear --bogus 3"], "unknown flags --bogus"),
                       (["--bench", "x=--k notanint --task linear"], "--bench x"),
                       (["--bench", "x=--task linear", "--bench", "x=--task arithmetic"], "twice")):
        assert eval_stage.main(parser.parse_args([*shared, "--out-dir", str(out / "bad"), *bench])) == 2
        assert msg in capsys.readouterr().err, bench
    assert eval_stage.main(parser.parse_args([*shared, "--bench", "x=--task linear"])) == 2
    assert "--out-dir" in capsys.readouterr().err

"""`nanoseek speedrun`: the plan's command lines are ones the stages accept; completion, staleness
and resume rules on files; the report from synthetic run files; and the smoke speedrun end to end:
SIGKILLed mid-stage it resumes without redoing finished stages, --force redoes, every report
section is there and the R1 model and the student load in nanoseek and transformers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nanoseek import recipe
from nanoseek.cli import COMMANDS, build_parser
from nanoseek.cli import main as cli_main
from nanoseek.report import SECTIONS, write_report
from nanoseek.stages.eval import parse_benches
from nanoseek.stages.speedrun import prepare, todo_stages


@pytest.mark.parametrize("preset", sorted(recipe.PRESETS))
def test_every_planned_command_parses_with_its_stage(preset):
    stages = recipe.plan(preset, "runs/x")
    assert [s.name for s in stages] == ["corpus", "tokenizer", "pretrain", "r1zero", "coldstart", "rl1", "rejection",
                                        "sft2", "r1", "student_base", "distill", "student_rl", "fp8", "eval", "report"]
    assert len(stages[-2].jobs) == len(recipe.MODELS) * len(recipe.EVAL_GROUPS)   # benchmarks grouped a process
    assert sorted(b for g in recipe.EVAL_GROUPS.values() for b in g) == sorted(recipe.BENCHMARKS)
    for stage in stages:
        assert stage.budget_s > 0, stage.name
        for job in stage.jobs:
            command = job.argv[0]
            argv = [*job.argv, *(["--resume"] if job.resume else [])]
            args = build_parser({command: COMMANDS[command]}).parse_args(argv)   # SystemExit on a bad flag
            if command == "eval":                                  # every benchmark, its files, its flags
                benches = parse_benches(args)
                model, group = job.label.split(".")
                assert [n for n, _ in benches] == [f"{model}.{b}" for b in recipe.EVAL_GROUPS[group]]
                assert job.marker == recipe.eval_file(os.path.dirname(args.out_dir), model, recipe.EVAL_GROUPS[group][-1])
                assert {os.path.join(args.out_dir, n + ".json") for n, _ in benches} <= set(job.outputs)
                assert all((a.task or a.data) and a.n_problems > 0 and a.k == benches[0][1].k for _, a in benches)
            else:
                assert getattr(args, "out", None) in (None, os.path.dirname(job.marker))


def _touch(path: str, t: float, text: str = "{}") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.utime(path, (t, t))


def test_done_stale_resume_and_fresh_follow_the_files(tmp_path):
    out = str(tmp_path)
    stages = recipe.plan("smoke", out)
    by = {s.name: s for s in stages}
    corpus, tok, pre, zero = by["corpus"], by["tokenizer"], by["pretrain"], by["r1zero"]
    _touch(corpus.jobs[0].marker, 100)
    _touch(tok.jobs[0].marker, 200, "")
    assert recipe.stage_done(corpus, by) and recipe.stage_done(tok, by) and not recipe.stage_done(pre, by)
    _touch(pre.jobs[0].marker, 300, "{not json")                   # a kill mid-write: not done
    assert not recipe.stage_done(pre, by)
    _touch(pre.jobs[0].marker, 300)
    assert recipe.stage_done(pre, by)
    _touch(corpus.jobs[0].marker, 400)                             # the corpus redone: the rest is stale
    assert not recipe.stage_done(tok, by) and not recipe.stage_done(pre, by)
    assert todo_stages(stages, set()) >= {"tokenizer", "pretrain", "r1zero", "eval", "report"}
    assert "corpus" in todo_stages(stages, {"corpus"}) and "corpus" not in todo_stages(stages, set())
    # an unfinished r1zero: resumed when it started from today's inputs, else started afresh
    st = {"jobs": {}}
    os.makedirs(os.path.join(out, "r1zero", "checkpoints", "step_000001"))
    assert prepare(zero.jobs[0], zero, by, st, forced=False) == "fresh"     # unknown start: cleared
    assert not os.path.exists(os.path.join(out, "r1zero"))
    os.makedirs(os.path.join(out, "r1zero", "checkpoints", "step_000001"))
    assert prepare(zero.jobs[0], zero, by, st, forced=False) == "resume"
    _touch(pre.jobs[0].marker, 500)                                # its base changed since
    assert prepare(zero.jobs[0], zero, by, st, forced=False) == "fresh"
    _touch(zero.jobs[0].marker, 600)
    assert prepare(zero.jobs[0], zero, by, st, forced=False) == "done"
    assert prepare(zero.jobs[0], zero, by, st, forced=True) == "fresh" and not os.path.exists(zero.jobs[0].marker)


# --- the report from synthetic files --------------------------------------------------------------
AHA = ("<think>\n3 + 4 * 2 = 3 + 8 = 12\nWait, let me check: 3 + 8 = 11.\n</think>\n<answer>\n11\n</answer>")


def _write_jsonl(path: str, recs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)


def _synthetic_run(out: str) -> None:
    for m in recipe.MODELS:
        for b in recipe.BENCHMARKS:
            base = recipe.eval_file(out, m, b)[: -len(".json")]
            r = {"n_problems": 2, "k": 4, "pass@1": 0.5, "pass@2": 0.6, "pass@4": 0.75, "cons@4": 0.5,
                 "mean_length": 20.0, "seconds": 2.0, "config": {"temperature": 0.6, "top_p": 0.95, "max_tokens": 32}}
            _write_jsonl(base + ".json", [r])
            texts = ["<think>\n3 + 8 = 11\n</think>\n<answer>\n11\n</answer>", "<think>\n算 3 + 8 so\n</think>",
                     AHA if (m, b) == ("r1", "heldout") else "x", "y"]
            _write_jsonl(base + ".records.jsonl", [{"prompt": "What is 3 + 4 * 2?", "answer": "11",
                                                    "task": "arithmetic", "texts": texts,
                                                    "scores": [1.0, 0.0, 1.0, 0.0]}])
    for run, weight in (("r1zero", 0), ("rl1", 1), ("rl2", 1), ("student_rl", 0)):
        recs = []
        for s in range(6):
            recs.append({"step": s, "lr": 5e-5, "reward": 0.1 * s, "response_len_mean": 20 + 4 * s,
                         "self_check_share": 0.01 * s, "language_mixed_share": 0.3 - 0.05 * s * weight, "tokens": 100})
            if s % 3 == 0:
                recs.append({"step": s, "heldout_pass@1": 0.1 * s, "heldout_cons@k": 0.1, "heldout_len": 21.0})
        _write_jsonl(os.path.join(out, run, "metrics.jsonl"), recs)
        _write_jsonl(os.path.join(out, run, "model", "nanoseek.json"),
                     [{"info": {"grpo": {"language_weight": weight}}}])
    with open(os.path.join(out, "r1zero", "accuracy.png"), "wb") as f:
        f.write(b"\x89PNG fake")
    for run, loss in (("pretrain", 2.0), ("fp8", 2.02)):
        recs = [{"step": s, "lr": 1e-3, "main_loss": loss - 0.1 * s, "tokens": 512,
                 "maxvio": {"L1": 1.0 / (s + 1), "MTP1": 0.5}, "maxvio_mean": 0.5}
                for s in range(10 if run == "fp8" else 20)]
        recs += [{"step": 10, "heldout_loss": loss - 0.5}]
        _write_jsonl(os.path.join(out, run, "metrics.jsonl"), recs)
        _write_jsonl(os.path.join(out, run, "summary.json"), [{"tokens_per_s": 1000.0}])


def test_report_has_every_section_from_synthetic_files(tmp_path):
    out = str(tmp_path)
    _synthetic_run(out)
    stages = recipe.plan("smoke", out)
    state = {"preset": "smoke", "stages": {"pretrain": {"status": "done", "seconds": 12.5, "tokens": 10240,
                                                        "attempts": [{"action": "fresh", "result": "killed"},
                                                                     {"action": "resume", "result": "done"}]}}}
    text = open(write_report(out, stages, state), encoding="utf-8").read()
    for section in SECTIONS:
        assert f"## {section}\n" in text, section
    assert "| R1 | 50.0 / 50.0 / 75.0 |" in text                       # pass@1 / cons@4 / pass@4, percent
    assert "| V3 tiny base | 50.0 / 50.0 / 75.0 | 50.0 / 50.0 / 75.0 |" in text and "| 20.0 | 80 |" in text
    assert AHA in text and "wrote a wrong step, checked, and ended right" in text
    assert "10,240" in text and "fresh (killed), resume" in text
    assert "| training loss, last 1 of 10 steps | 1.1000 | 1.1200 | 1.8 % |" in text
    assert "| L1 | 1.000 |" in text
    assert "| 0 | 0.0 | 10.0 | 21.0 |" in text                            # R1-Zero's held-out curve
    for png in ("r1zero_accuracy.png", "language_mixing.png", "fp8_loss.png", "maxvio.png"):
        assert os.path.exists(os.path.join(out, png)), png


def test_report_of_an_empty_run_still_has_every_section(tmp_path):
    text = open(write_report(str(tmp_path), recipe.plan("smoke", str(tmp_path)), {}), encoding="utf-8").read()
    assert all(f"## {s}\n" in text for s in SECTIONS)
    assert "No evaluation response both checked itself" in text


# --- the smoke speedrun end to end ------------------------------------------------------------------
def _speedrun(out: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.Popen([sys.executable, "-m", "nanoseek", "speedrun", "--preset", "smoke", "--out", out, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    try:
        log = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, log[-4000:]
    return log


def _state(out: str) -> dict:
    with open(os.path.join(out, recipe.STATE_FILE)) as f:
        return json.load(f)["stages"]


def _parallel_matmul(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    a = torch.randn(256, 256)
    for _ in range(3):
        a = torch.tanh(a @ a)
    sys.exit(0 if torch.get_num_threads() == threads else 3)


def test_jobs_forked_from_the_preloaded_server_run_parallel_ops(tmp_path):
    """A module in PRELOAD that runs a parallel op at import (the oneDNN probe did) leaves OpenMP
    hanging in every forked job that uses 2 threads: the smoke run (1 thread) would not notice."""
    import multiprocessing
    from nanoseek.stages.speedrun import PRELOAD, Runner
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("no forkserver start method on this platform")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    for threads in (2, 1):
        p = ctx.Process(target=_parallel_matmul, args=(threads,))
        p.start()
        rc = Runner.wait(p, 120)
        if rc is None:
            p.kill()
        assert rc == 0, f"a {threads}-thread job forked from the fork server: {'hung' if rc is None else rc}"


def test_smoke_speedrun_killed_mid_stage_resumes_then_force_redoes(tmp_path):
    """The CI run of the whole recipe (~4-5 minutes on 2 cores, nearly all of it Python start-ups)."""
    out = str(tmp_path / "smoke")
    proc = _speedrun(out)
    ckpt, t0 = os.path.join(out, "r1zero", "checkpoints", "step_000001"), time.time()
    while not os.path.isdir(ckpt):                                   # GRPO checkpoints every step here
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() - t0 < 600, "no r1zero checkpoint after 600 s"
        time.sleep(0.05)
    assert cli_main(["speedrun", "--preset", "smoke", "--out", out]) == 2     # one speedrun a directory
    os.killpg(proc.pid, signal.SIGKILL)                                # the speedrun and its stage process
    proc.wait(30)
    assert not os.path.exists(os.path.join(out, "r1zero", "summary.json"))
    before = _state(out)
    assert before["pretrain"]["status"] == "done" and before["r1zero"]["status"] == "running"

    log = _finish(_speedrun(out))
    after = _state(out)
    for name in ("corpus", "tokenizer", "pretrain"):                   # finished stages were not redone
        assert after[name]["attempts"][-1]["action"] == "skipped" and f"{name:<12s} skipped" in log
        assert after[name]["finished"] == before[name]["finished"]
    assert [a["action"] for a in after["r1zero"]["attempts"]] == ["fresh", "resume"]
    assert after["r1zero"]["attempts"][0]["result"] == "killed"
    assert "resumed from" in open(os.path.join(out, "logs", "r1zero.log")).read()
    assert all(st["status"] == "done" for st in after.values()), after
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert all(f"## {s}\n" in report for s in SECTIONS)
    assert "| R1 |" in report and "| student, RL only |" in report

    from transformers import AutoModelForCausalLM
    from nanoseek import load_pretrained
    for name, model_type in (("r1", "deepseek_v3"), ("student", "qwen2")):
        path = os.path.join(out, name)
        assert load_pretrained(path).config.model_type == model_type
        assert AutoModelForCausalLM.from_pretrained(path).config.model_type == model_type

    first_eval = os.path.getmtime(recipe.eval_file(out, "base", "heldout"))
    log = _finish(_speedrun(out, "--force", "fp8"))                    # a stage no other stage reads: cheap
    again = _state(out)
    assert again["fp8"]["attempts"][-1]["action"] == "fresh" and f"{'fp8':<12s} done" in log
    assert again["r1"]["attempts"][-1]["action"] == "skipped" and f"{'r1zero':<12s} skipped" in log
    assert again["eval"]["attempts"][-1]["action"] == "skipped"
    assert os.path.getmtime(recipe.eval_file(out, "base", "heldout")) == first_eval      # not redone

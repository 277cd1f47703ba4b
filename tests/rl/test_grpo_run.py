"""GRPO end to end on a micro model: the CLI's run (metrics, plots, checkpoints, exact resume),
rollouts sharing their prompt's blocks, the prefix cache cleared by a weight update, and two gloo
ranks computing what one process computes."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import main as cli_main
from nanoseek.engine import LLM, SamplingParams
from nanoseek.eval.problems import read_problem_file
from nanoseek.rl import rollout
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.metrics import read_metrics
from tests.train.fixtures import TORCHRUN, make_corpus, pretrain_args, torchrun

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A micro base model (2 pretraining steps) and the corpus it came from."""
    root = str(tmp_path_factory.mktemp("grpo"))
    data, tok = make_corpus(root)
    assert cli_main(pretrain_args(data, tok, os.path.join(root, "pre"), 2, "--no-plots")) == 0
    return root, data, os.path.join(root, "pre", "model")


def grpo_args(init, data, out, steps=4, *extra):
    return ["grpo", "--init", init, "--data", data, "--out", out, "--steps", str(steps), "--prompts-per-step", "4",
            "--group-size", "4", "--max-tokens", "12", "--eval-problems", "4", "--eval-k", "4", "--eval-every", "2",
            "--ckpt-every", "2", "--lr", "1e-3", "--micro-batch", "8", "--threads", "1", "--no-progress", *extra]


def test_grpo_smoke_run_logs_everything_and_resumes_exactly(base, tmp_path):
    root, data, init = base
    out = str(tmp_path / "run")
    assert cli_main(grpo_args(init, data, out, 4, "--beta", "0.01")) == 0
    recs = read_metrics(out)
    steps = [r for r in recs if "reward" in r]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    for key in ("accuracy", "format", "response_len_mean", "response_len_median", "kl", "clip_frac", "entropy",
                "self_check_share", "language_mixed_share", "rollout_tokens_per_s", "train_tokens_per_s", "lr"):
        assert key in steps[0], key
    evals = [r for r in recs if "heldout_pass@1" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(0 <= r["heldout_pass@1"] <= 1 for r in evals)
    assert all(os.path.exists(os.path.join(out, f)) for f in ("accuracy.png", "length.png", "summary.json"))
    final = load_file(os.path.join(out, "model", "model.safetensors"))
    start = load_file(os.path.join(init, "model.safetensors"))
    assert any(not torch.equal(final[k], start[k]) for k in start if "layers.0." in k)   # the policy moved
    # resume from the step-2 checkpoint of a copy == the uninterrupted run
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    os.symlink(os.path.join(out, "checkpoints", "step_000002"), os.path.join(resumed, "checkpoints", "step_000002"))
    assert cli_main(grpo_args(init, data, resumed, 4, "--beta", "0.01", "--resume", "--keep", "5")) == 0
    again = load_file(os.path.join(resumed, "model", "model.safetensors"))
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_group_shares_prompt_blocks_and_an_update_clears_the_prefix_cache(base):
    _, data, init = base
    model, tok = load_pretrained(init).train(), Tokenizer.load(init)
    llm = LLM(model, tok, block_size=4)
    problem = read_problem_file(os.path.join(data, "problems", "rl.jsonl"))[0]
    prompt = rollout.prompt_text(problem, "r1zero")
    rid = llm.add_request(prompt, SamplingParams(n=4, max_tokens=8, seed=1))
    llm.step()                                                 # the prefill, then the forks
    seqs = llm.requests[rid].seqs
    full = len(llm.encode(prompt)) // 4                        # the prompt's full blocks
    assert len(seqs) == 4 and full >= 2
    tables = [s.block_table[:full] for s in seqs]
    assert all(t == tables[0] for t in tables)                  # one copy of the prompt's KV …
    assert all(llm.blocks.ref[b] == 4 for b in tables[0])        # … referenced by the 4 samples
    while llm.has_unfinished():
        llm.step()
    # a new request for the same prompt hits the cache; after a weight update it must not
    hit = llm.generate([prompt], SamplingParams(max_tokens=2))[0][0]
    assert hit.cached_prompt_tokens == 4 * ((len(llm.encode(prompt)) - 1) // 4)  # all but the last token's block
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    llm.update_weights()
    miss = llm.generate([prompt], SamplingParams(max_tokens=2))[0][0]
    assert miss.cached_prompt_tokens == 0


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_two_gloo_ranks_equal_one_process(base, tmp_path):
    _, data, init = base
    single, double = str(tmp_path / "one"), str(tmp_path / "two")
    assert cli_main(grpo_args(init, data, single, 2, "--no-plots")) == 0
    torchrun(grpo_args(init, data, double, 2, "--no-plots"))
    a = load_file(os.path.join(single, "model", "model.safetensors"))
    b = load_file(os.path.join(double, "model", "model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max() / max(1.0, float(a[k].abs().max()))) for k in a)
    assert worst <= 1e-4, worst
    ra = [r for r in read_metrics(single) if "reward" in r]
    rb = [r for r in read_metrics(double) if "reward" in r]
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]             # the same rollouts
    assert json.load(open(os.path.join(single, "summary.json")))["steps"] == 2

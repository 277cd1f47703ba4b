"""Shared set-up of the training tests: a tiny real corpus and tokenizer, the pretrain flags."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from nanoseek.data.corpus import build, scaled
from nanoseek.data.corpus import tiny as tiny_corpus
from nanoseek.tokenizer import train_tokenizer

# the model of every stage test: hidden 64, 1 dense + 1 MoE layer, 8 experts top-2, one MTP depth
TINY_MODEL = ["--set", "hidden_size=64", "--set", "num_hidden_layers=2", "--set", "intermediate_size=64",
              "--set", "moe_intermediate_size=32", "--set", "q_lora_rank=32", "--set", "kv_lora_rank=32"]


def make_corpus(out) -> tuple[str, str]:
    """A ~400-document corpus (the real `nanoseek corpus` writer) and a 300-token BPE: (data, tokenizer)."""
    data, tok_dir = os.path.join(out, "corpus"), os.path.join(out, "tokenizer")
    build(scaled(tiny_corpus(), 0.01), data, seed=0)
    with open(os.path.join(data, "pretrain", "train-00000.jsonl")) as f:
        train_tokenizer([json.loads(line)["text"] for line in f], 300).save(tok_dir)
    return data, tok_dir


def pretrain_args(data, tok, out, steps=6, *extra) -> list[str]:
    return ["pretrain", "--data", data, "--tokenizer", tok, "--out", out, *TINY_MODEL, "--steps", str(steps),
            "--seq-len", "32", "--batch-size", "8", "--micro-batch", "4", "--eval-every", "3",
            "--ckpt-every", "3", "--eval-rows", "8", "--warmup", "2", "--threads", "1", "--no-progress", *extra]


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> str:
    """`torchrun --standalone --nproc_per_node N -m nanoseek ARGS` (1 thread a rank); its output.
    Own session, so a hung run is killed with its workers; fails the test on a non-zero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "nanoseek", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, log[-3000:]
    return log

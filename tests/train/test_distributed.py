"""torchrun with 2 gloo processes == 1 process on the same global batch (DDP and FSDP2)."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.cli import main as cli_main
from tests.train.fixtures import TORCHRUN, make_corpus, pretrain_args, torchrun

@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist"))
    data, tok = make_corpus(root)
    out = os.path.join(root, "single")
    # one process, 4 micro-batches of 2 rows = the same 8-row global batch the two ranks split
    assert cli_main(pretrain_args(data, tok, out, 4, "--micro-batch", "2", "--no-plots")) == 0
    return root, data, tok, load_file(os.path.join(out, "model", "model.safetensors"))


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_ranks_equal_one_process(single, parallel):
    root, data, tok, ref = single
    out = os.path.join(root, parallel)
    args = pretrain_args(data, tok, out, 4, "--micro-batch", "2", "--no-plots", "--parallel", parallel)
    torchrun(args)
    got = load_file(os.path.join(out, "model", "model.safetensors"))
    assert got.keys() == ref.keys()
    # max |a − b| / max(1, max |a|) per tensor (the Foundation's parity measure), router biases included
    worst = max(float((got[k] - ref[k]).abs().max() / max(1.0, float(ref[k].abs().max()))) for k in ref)
    assert worst <= 1e-4, worst
    bias = [k for k in ref if k.endswith("e_score_correction_bias")]
    assert bias and all(torch.equal(got[k], ref[k]) for k in bias)   # same sign steps from all-reduced loads

"""`nanoseek grpo`: reinforcement learning from rule rewards (GRPO), R1-Zero when started from a base model.

    nanoseek grpo --init runs/tiny/pretrain/model --data runs/tiny/corpus --out runs/tiny/r1zero
    torchrun --nproc_per_node 2 -m nanoseek grpo …                 # data-parallel (DDP, gloo on CPU)

Only flags and wiring: the policy (an HF directory `load_pretrained` accepts), its tokenizer, a
frozen reference copy when β > 0, the engine on the live policy, the prompts (the corpus's
`problems/rl.jsonl`, a seeded order per epoch), the held-out evaluation (`problems/eval.jsonl`:
pass@1 over k samples at T = 0.6, top-p 0.95, and cons@k, R1's protocol, every --eval-every
steps), then the one training loop (train/loop.py) around rl/step.py's GRPO step. Writes the
run directory like every stage (checkpoints/, model/, metrics.jsonl, summary.json) and the R1-Zero
plots (rl/plots.py: accuracy.png, length.png, behaviour.png, optimisation.png).

Defaults are the tiny R1-Zero run's (README): 16 prompts × G = 8 at T = 1.0, lr 1e-5 constant,
β = 0, μ = 1, the R1-Zero template, accuracy + format rewards with equal weight (spec §8.2).
"""
from __future__ import annotations

import copy
import os
import sys

import torch

from nanoseek.checkpoint import load_pretrained, resolve_model_dir
from nanoseek.data.packing import RowOrder
from nanoseek.engine import LLM
from nanoseek.eval.evaluate import EvalConfig, evaluate
from nanoseek.eval.problems import read_problem_file
from nanoseek.flags import add_dataclass_arguments, from_args
from nanoseek.rl.step import GRPOConfig, grpo_stage
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import distributed, loop
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import build_optimizer

# TrainConfig fields that mean nothing to GRPO (sequence packing, MoE balancing, MTP, FP8, FSDP)
NOT_FOR_GRPO = ("seq_len", "batch_size", "eval_rows", "gamma", "alpha", "mtp_weight", "precision", "fp8_backend",
                "parallel", "min_lr_ratio", "decay_frac")


def add_arguments(p) -> None:
    p.add_argument("--init", default="runs/tiny/pretrain/model", help="the policy's starting point: a model "
                   "directory (or a run directory with model/)")
    p.add_argument("--data", default="runs/tiny/corpus", help="corpus directory: problems/rl.jsonl (prompts) and "
                   "problems/eval.jsonl (held-out evaluation)")
    p.add_argument("--eval-problems", type=int, default=64, help="held-out problems per evaluation")
    p.add_argument("--eval-k", type=int, default=16, help="samples per held-out problem (pass@1 over k, cons@k)")
    p.add_argument("--eval-max-tokens", type=int, default=None, help="evaluation length limit (default: --max-tokens)")
    add_dataclass_arguments(p, GRPOConfig)
    add_dataclass_arguments(p, TrainConfig, skip=NOT_FOR_GRPO, out="runs/tiny/grpo", steps=60, lr=1e-5, warmup=0,
                            schedule="constant", eval_every=10, ckpt_every=20, micro_batch=32)


def heldout_evaluation(llm, problems, ecfg: EvalConfig, dist):
    """step -> {"heldout_pass@1", "heldout_cons@k", "heldout_len"}: each rank scores its share of the
    held-out problems, the sums are all-reduced (the same numbers for any world size)."""
    share = problems[dist.rank::dist.world]

    def run(_step: int) -> dict:
        llm.model.eval()
        res = evaluate(llm, share, ecfg) if share else {"n_problems": 0}
        llm.model.train()
        llm.clear_prefix_cache()
        n = res["n_problems"]
        local = torch.tensor([n * res.get("pass@1", 0.0), n * res.get(f"cons@{ecfg.k}", 0.0),
                              n * res.get("mean_length", 0.0), n * res.get("step_accuracy", 0.0), float(n)])
        tot = dist.all_reduce_sum(local)
        n_all = max(float(tot[4]), 1.0)
        return {"heldout_pass@1": float(tot[0]) / n_all, "heldout_cons@k": float(tot[1]) / n_all,
                "heldout_len": float(tot[2]) / n_all, "heldout_step_accuracy": float(tot[3]) / n_all}

    return run


def main(args) -> int:
    cfg = from_args(TrainConfig, args, precision="fp32", gamma=0.0, alpha=0.0, mtp_weight=0.0)
    gcfg = from_args(GRPOConfig, args)
    dist = loop.setup(cfg)
    init = resolve_model_dir(args.init)
    try:
        rl_problems = read_problem_file(os.path.join(args.data, "problems", "rl.jsonl"))
        eval_problems = read_problem_file(os.path.join(args.data, "problems", "eval.jsonl"))[: args.eval_problems]
    except (OSError, ValueError) as e:
        print(f"nanoseek grpo: cannot read the problems: {e} (write them with `nanoseek corpus`)", file=sys.stderr)
        return 2
    tok = Tokenizer.load(init)
    torch.manual_seed(cfg.seed)
    policy = load_pretrained(init, dtype=torch.float32).train()
    policy.mtp.requires_grad_(False)                     # MTP is not trained by RL
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if gcfg.beta > 0 else None
    per_rank = gcfg.prompts_per_step // max(dist.world, 1)
    llm = LLM(policy, tok, max_num_seqs=max(256, per_rank * gcfg.group_size),
              max_num_batched_tokens=4096, kv_cache_memory=512 << 20)
    model = distributed.wrap(policy, dist, "ddp")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.moments)
    order = RowOrder(len(rl_problems), seed=cfg.seed)
    ecfg = EvalConfig(k=args.eval_k, max_tokens=args.eval_max_tokens or gcfg.max_tokens, template=gcfg.template,
                      seed=cfg.seed, n_problems=len(eval_problems))
    stage = grpo_stage(cfg, gcfg, model, optimizer, llm, ref, lambda g: rl_problems[order(g)], dist,
                       heldout_evaluation(llm, eval_problems, ecfg, dist))
    stage.epoch = lambda position: position / len(rl_problems)
    dist.print0(f"grpo from {init}: {len(rl_problems)} prompts, {gcfg.prompts_per_step} × G={gcfg.group_size} per "
                f"step, {gcfg.objective}, β={gcfg.beta}, μ={gcfg.mu}, lr {cfg.lr}; held-out {len(eval_problems)} × "
                f"k={ecfg.k} every {cfg.eval_every} steps")
    info = {"init": init, "data": args.data, "grpo": vars(gcfg), "eval": vars(ecfg)}
    rc = loop.run(cfg, stage, model, optimizer, tok, dist, cfg.steps, info)
    distributed.shutdown(dist)
    return rc

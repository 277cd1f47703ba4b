"""`nanoseek bench grpo`: one GRPO optimizer step, nanoseek vs TRL's `GRPOTrainer` (TRL 1.16, the
`bench` extra; imported here only, never by the library).

The work per step, the same on both sides: 16 prompts × G = 8 samples × exactly 64 completion tokens
(random models almost never emit EOS; nanoseek's `ignore_eos`, TRL's `min_new_tokens=64`, so both
generate 128 × 64 tokens: `*_completion_tokens_per_step`), T = 1, top-p 1, then one optimizer step
over the 128 rows in micro-batches of `--micro` (TRL: per_device_train_batch_size = micro, gradient
accumulation 128 / micro, one generation per step). Same weights: nanoseek builds the tiny preset
(MTP off: transformers has none; vocab 1024: a BPE trained here on 400 lines of pseudo-words) and saves
it with `save_pretrained` + tokenizer; transformers' DeepseekV3ForCausalLM loads that directory for
TRL (`parity_max_rel_diff`: max |Δlogit| / max |logit| before training). Same prompts in the same
order (TRL's `shuffle_dataset=False`), the same rule reward (share of "a" in the text: cheap, and
varies inside a group so advantages are non-zero).
  nanoseek  rl/step.py's pieces: engine `LLM.generate` on the live policy (n = G per request, shared
            prefill), Rollout + `training_rows`, `group_advantages` (std-scaled = TRL's "group"),
            `update` (the library's optimizer step: micro-batch accumulation, clip 1.0) with the
            "dapo" objective (token-level, ε = 0.2 both sides, global token count = TRL's "dapo"),
            `build_optimizer` (torch AdamW, what `nanoseek grpo` uses). β > 0 (`--beta 0.04`): the
            "grpo" objective (dapo has no KL) + a frozen reference forward, as TRL adds one.
  TRL       GRPOTrainer, loss_type "dapo", scale_rewards "group", ε 0.2, num_iterations 1, fused
            AdamW, max_grad_norm 1, linear LR decay; `trl_fp32`: bf16=False, gradient_checkpointing
            False; `trl_defaults`: TRL's CPU defaults (bf16 autocast + gradient checkpointing on).
Not reproduced from grpo_stage.step: DAPO's dynamic sampling / overlong filter (with every completion
at the length limit it would mask all tokens; TRL's "dapo" has neither) and the metrics all-reduce.

Timing: TRL drives (`trainer.train()`); a callback takes the wall time between consecutive
`on_step_end`s (the whole step: batch fetch, generate, reward, fwd/bwd, optimizer, scheduler) and
then runs nanoseek's step(s) in the same process, so load from other jobs hits both alike. Phase 1:
trl_fp32 ⇄ nanoseek fp32; phase 2: trl_defaults ⇄ nanoseek fp32 (⇄ nanoseek bf16-update). `--warmup`
untimed steps per phase, medians over `--reps`. Ratios = TRL s / nanoseek s (> 1: nanoseek faster).
nanoseek's split: `rollout_s` = LLM.generate; `update_s` = reference pass (β > 0) + `update()` +
prefix-cache clear; `other_s` = the rest, bounded by per-completion Python over 128 rows (Rollout,
reward on 128 texts, padding the [128, ~80] rows): a few ms. TRL's `generate_s` = its
_generate_single_turn. `best`: `nanoseek grpo` runs fp32 only (stages/grpo.py forces it; bf16 would
need a --precision there), so step_best_vs_trl_defaults uses nanoseek fp32. `nanoseek_bf16_*` and
`bf16_update_vs_trl_defaults` (figures, not ratios) preview bf16 autocast around `update()` (done
here, by the benchmark; rollout stays fp32); `--skip-bf16` drops it.

Measured (2026-11-30, quiet machine, 2 threads; an AVX2 EPYC without bf16 kernels, where a bf16
matmul runs at ~0.8 GFLOP/s): `nanoseek bench grpo --json --reps 3 --warmup 1 --skip-bf16`
    trl_fp32 6.31 s/step (generate 3.51)   nanoseek fp32 4.37 s/step (rollout 2.11, update 2.25)
    step_fp32_vs_trl_fp32 1.44             trl_defaults (bf16 autocast + checkpointing) 43.0 s/step
    step_best_vs_trl_defaults 9.19 — inflated here by the emulated bf16 of TRL's CPU defaults (on
    the AVX-512-BF16 machine of cpu_facts §10 they took ~3 s a step): rerun there before quoting it.
What bounds nanoseek's step: half is rollout (64 decode steps of 128 sequences through the eager
engine: the per-step op count, see the engine-speed issue), half the update (forward + backward of
128 × ~84 tokens in fp32, at the model's training MFU). Both sides generate exactly 64 tokens.
TRL quirks handled: bf16 on CPU needs `use_cpu=True` (else transformers refuses bf16), and
Trainer prints its log dict on stdout (redirected to stderr so `--json` stays one object).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import os
import random
import statistics
import sys
import tempfile
import time

import torch

from nanoseek.bench.common import cpu_jiffies, omp_wait, other_cores, report
from nanoseek.checkpoint import save_pretrained
from nanoseek.config import preset
from nanoseek.engine import LLM, SamplingParams
from nanoseek.model import Transformer
from nanoseek.rl import grpo as G
from nanoseek.rl.rollout import Rollout, request_seed, training_rows
from nanoseek.rl.step import GRPOConfig, clip_range, logprobs_no_grad, objective, update
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train import distributed
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import build_optimizer


def add_arguments(p) -> None:
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--tokens", type=int, default=64, help="completion tokens (forced: no early EOS)")
    p.add_argument("--micro", type=int, default=32, help="rows per forward/backward (both sides)")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0.04: with a reference model)")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate (TRL's default)")
    p.add_argument("--reps", type=int, default=7, help="timed steps per phase (medians)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per phase first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--omp-wait", choices=["auto", "passive", "keep"], default="auto",
                   help="OMP_WAIT_POLICY=PASSIVE (re-executes), keep the environment's, or auto = passive when "
                        "other processes use >= 0.25 of a core at the start (see bench/model.py)")
    p.add_argument("--skip-bf16", action="store_true", help="skip the nanoseek bf16-update preview")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, prompts and sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# ------------------------------------------------------------------ shared inputs
def reward(texts) -> list[float]:
    """The rule reward both sides use: share of "a" characters."""
    return [t.count("a") / max(1, len(t)) for t in texts]


def text_and_tokenizer(n_prompts: int, seed: int):
    """A 1024-token BPE trained on 400 pseudo-word lines, and `n_prompts` prompts of 8 such words."""
    rng = random.Random(seed)
    syl = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randrange(1, 4))) for _ in range(1500)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(400)]
    tok = train_tokenizer(lines, vocab_size=1024)
    prompts = ["Say more: " + " ".join(rng.choice(words) for _ in range(8)) for _ in range(n_prompts)]
    return tok, prompts


# ------------------------------------------------------------------ nanoseek's step
class Nanoseek:
    def __init__(self, model, tok, args):
        self.policy, self.args, self.G, self.T = model, args, args.group, args.tokens
        self.llm = LLM(model, tok, max_num_seqs=max(256, args.prompts * args.group), max_num_batched_tokens=4096,
                       kv_cache_memory=512 << 20)                        # what stages/grpo.py builds
        self.opt = build_optimizer(model, args.lr, 0.0, (0.9, 0.999))
        self.ref = copy.deepcopy(model).eval().requires_grad_(False) if args.beta else None
        gcfg = GRPOConfig(group_size=args.group, objective="grpo" if args.beta else "dapo", eps=0.2, eps_high=0.2,
                          beta=args.beta, max_tokens=args.tokens)
        self.loss_fn, self.clip = objective(gcfg, args.tokens), clip_range(gcfg)
        self.cfg, self.dist = TrainConfig(grad_clip=1.0, micro_batch=args.micro), distributed.init()
        self.pad = tok.pad_id

    def step(self, k: int, prompts: list[str], bf16: bool) -> dict:
        t0 = time.perf_counter()
        self.policy.eval()
        params = [SamplingParams(n=self.G, temperature=1.0, top_p=1.0, max_tokens=self.T, ignore_eos=True,
                                 seed=request_seed(self.args.seed, k, i)) for i in range(len(prompts))]
        outs = self.llm.generate(prompts, params)
        self.policy.train()
        t1 = time.perf_counter()
        roll = Rollout([], [], [], [], [], self.G)
        for p, comps in zip(prompts, outs):
            for c in comps:
                roll.prompt_ids.append(self.llm.encode(p))
                roll.completion_ids.append(list(c.token_ids))
                roll.texts.append(c.text)
        adv = G.group_advantages(torch.tensor(reward(roll.texts)), self.G)
        ids, mask = training_rows(roll, self.pad)
        t2 = time.perf_counter()
        micro = self.args.micro
        ref = logprobs_no_grad(self.ref, ids, micro) if self.ref is not None else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            update(self.policy, self.opt, ids, mask, adv, None, ref, self.loss_fn, self.clip, self.cfg, self.dist,
                   micro, float(len(ids)), float(mask.sum()))
        self.llm.update_weights()
        t3 = time.perf_counter()
        return {"s": t3 - t0, "rollout_s": t1 - t0, "update_s": t3 - t2, "other_s": t2 - t1,
                "completion_tokens": float(sum(roll.lengths))}


# ------------------------------------------------------------------ TRL
def trl_trainer(model_dir: str, prompts: list[str], args, defaults: bool, callback, log: dict):
    import datasets
    import transformers
    from trl import GRPOConfig as TRLConfig, GRPOTrainer

    steps = args.warmup + args.reps
    extra = {} if defaults else {"bf16": False, "gradient_checkpointing": False}
    targs = TRLConfig(output_dir=os.path.join(model_dir, "trl"), max_steps=steps, learning_rate=args.lr,
                      per_device_train_batch_size=args.micro,
                      gradient_accumulation_steps=args.prompts * args.group // args.micro,
                      num_generations=args.group, max_completion_length=args.tokens, temperature=1.0, top_p=1.0,
                      generation_kwargs={"min_new_tokens": args.tokens}, beta=args.beta, loss_type="dapo",
                      scale_rewards="group", epsilon=0.2, num_iterations=1, optim="adamw_torch_fused",
                      max_grad_norm=1.0, shuffle_dataset=False, report_to="none", save_strategy="no",
                      logging_steps=10 ** 6, disable_tqdm=True, seed=args.seed, use_cpu=True, **extra)

    def rule(completions, completion_ids, **kw):
        log["tokens"].append(float(sum(len(c) for c in completion_ids)))
        return reward(completions)
    rule.__name__ = "share_of_a"
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=rule, args=targs,
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                          processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
                          callbacks=[callback])
    gen = trainer._generate_single_turn

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = gen(*a, **kw)
        log["generate_s"].append(time.perf_counter() - t0)
        return out
    trainer._generate_single_turn = timed_generate
    return trainer


def interleave(args, nano_runs: dict, prompts: list[str], log: dict):
    """A TrainerCallback: times each TRL step, then runs every nanoseek variant once (order alternating)."""
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        t = 0.0

        def on_train_begin(self, *a, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            dt, k = time.perf_counter() - self.t, state.global_step - 1
            timed = k >= args.warmup
            if timed:
                log["s"].append(dt)
            batch = [prompts[(k * args.prompts + i) % len(prompts)] for i in range(args.prompts)]
            names = list(nano_runs) if k % 2 == 0 else list(nano_runs)[::-1]
            for name in names:
                got = nano_runs[name](k, batch)
                if timed:
                    for key, v in got.items():
                        log.setdefault(f"{name}_{key}", []).append(v)
            self.t = time.perf_counter()
    return Interleave()


# ------------------------------------------------------------------ the run
def main(args) -> int:
    omp_wait(args.omp_wait, "grpo")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prompts * args.group % args.micro:
        raise SystemExit(f"--micro {args.micro} must divide {args.prompts * args.group} rows")
    import transformers
    import trl
    transformers.logging.set_verbosity_error()
    tok, prompts = text_and_tokenizer(args.prompts * (args.warmup + args.reps), args.seed)
    cfg = preset(args.preset, num_nextn_predict_layers=0, vocab_size=tok.vocab_size)
    torch.manual_seed(args.seed)
    policy = Transformer(cfg).train()
    nano = Nanoseek(policy, tok, args)
    variants = {"nanoseek_fp32": lambda k, b: nano.step(k, b, False)}
    if not args.skip_bf16:
        variants["nanoseek_bf16"] = lambda k, b: nano.step(k, b, True)
    logs: dict = {}
    j0, t0 = cpu_jiffies(), time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(policy, d, tokenizer=tok)
        ids = torch.tensor([nano.llm.encode(prompts[0])])
        with torch.no_grad():
            theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits
            ours = policy(ids, mtp=False).logits
        parity = float((theirs - ours).abs().max() / theirs.abs().max())
        for phase, defaults, runs in (("trl_fp32", False, {"nanoseek_fp32": variants["nanoseek_fp32"]}),
                                      ("trl_defaults", True, variants)):
            log = logs[phase] = {"s": [], "generate_s": [], "tokens": []}
            with contextlib.redirect_stdout(sys.stderr):                # Trainer prints its logs
                trainer = trl_trainer(d, prompts, args, defaults, interleave(args, runs, prompts, log), log)
                gc.collect()
                gc.freeze()
                trainer.train()
                gc.unfreeze()
            del trainer
    load = other_cores(j0, cpu_jiffies(), time.perf_counter() - t0)
    med = statistics.median
    a, b = logs["trl_fp32"], logs["trl_defaults"]
    figures: dict = {"parity_max_rel_diff": parity}
    for phase, log in logs.items():
        figures[f"{phase}_s_per_step"] = med(log["s"])
        figures[f"{phase}_generate_s"] = med(log["generate_s"][args.warmup:] or log["generate_s"])
        figures[f"{phase}_completion_tokens_per_step"] = med(log["tokens"])
    for key in ("s", "rollout_s", "update_s", "other_s", "completion_tokens"):
        name = "s_per_step" if key == "s" else ("completion_tokens_per_step" if key == "completion_tokens" else key)
        figures[f"nanoseek_fp32_{name}"] = med(a[f"nanoseek_fp32_{key}"])
        if "nanoseek_bf16_s" in b:
            figures[f"nanoseek_bf16_{name}"] = med(b[f"nanoseek_bf16_{key}"])
    figures["nanoseek_best_s_per_step"] = med(b["nanoseek_fp32_s"])      # phase 2's nanoseek fp32
    figures["nanoseek_best_precision"] = "fp32"
    if "nanoseek_bf16_s" in b:
        figures["bf16_update_vs_trl_defaults"] = med(b["s"]) / med(b["nanoseek_bf16_s"])
    figures["other_cpu_load"] = load
    ratios = {"step_fp32_vs_trl_fp32": med(a["s"]) / med(a["nanoseek_fp32_s"]),
              "step_best_vs_trl_defaults": med(b["s"]) / med(b["nanoseek_fp32_s"])}
    config = {"preset": args.preset, "vocab_size": cfg.vocab_size, "mtp": False, "prompts": args.prompts,
              "group": args.group, "completion_tokens": args.tokens, "micro_batch": args.micro, "beta": args.beta,
              "lr": args.lr, "reps": args.reps, "warmup": args.warmup, "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
              "prompt_tokens_mean": statistics.mean(len(nano.llm.encode(p)) for p in prompts),
              "nanoseek_objective": "grpo" if args.beta else "dapo", "trl_loss_type": "dapo",
              "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    report("grpo", config, figures, ratios, args.json)
    return 0

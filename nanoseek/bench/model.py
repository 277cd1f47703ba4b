"""`nanoseek bench model`: training step and prefill, nanoseek vs transformers' DeepseekV3ForCausalLM.

Same config and same weights: nanoseek builds the model (MTP off, `num_nextn_predict_layers=0`:
transformers has no MTP, so both run the same main model), writes it with `save_pretrained`, and
transformers loads that directory with `DeepseekV3ForCausalLM.from_pretrained` (its defaults on
this CPU: SDPA attention, `grouped_mm` experts). `parity_max_rel_diff` (max |Δlogit| / max |logit|)
shows they compute the same function.

Timed, per side, in one process with the same threads:
  train_fp32 / train_bf16   forward + backward + AdamW on batch 8 × 256; loss = cross-entropy of
                            each position's logits against the next token, the same function for
                            both, outside the models; bf16 = torch.autocast(bfloat16) with fp32
                            master weights on both sides (nanoseek's bf16 path: train.py autocasts)
  prefill_fp32 / _bf16      forward of batch 8 × 256 under no_grad (transformers with use_cache=False:
                            no KV cache on either side)
  peak_fp32 / _bf16         a 1024³ GEMM at each precision (the MFU denominator)
Each round times every item once, in turn, so the load other processes put on this shared machine
falls on both sides alike; `--warmup` untimed rounds first, figures are medians over `--reps`
rounds. `other_cpu_load` = median cores' worth of CPU other processes used while we timed.

MFU = FLOPs per token × tokens/s ÷ the measured peak of the step's precision, with FLOPs per token
from nanoseek/train/flops.py (the formula training's summary uses too: 6·N + 3·L·H·(d_qk + d_v)·(T + 1)
training, 2·N + L·H·(d_qk + d_v)·(T + 1) prefill). `mfu_best` is nanoseek's faster precision
against that precision's peak.

The process, the same for both sides:
  - OpenMP waiting (`--omp-wait`): libgomp spins before it sleeps. When another process holds a
    core of this 2-core machine, two spinning threads fight it at every parallel region and a step
    gets 5–10× slower (tiny fp32, one other process at 100 %: 664 tokens/s spinning, 4,047 with
    OMP_WAIT_POLICY=PASSIVE), by an amount that depends on how many parallel regions each side
    opens more than on the model. On a quiet machine spinning is faster (tiny fp32: 8,200 vs
    6,600 tokens/s). `auto` samples the load for a second first and, when other processes use a
    quarter of a core or more, re-executes the command with PASSIVE (libgomp reads the variable
    when torch loads it). `config.omp_wait_policy` says which ran.
  - `gc.freeze()` once both models exist: otherwise Python's cyclic GC walks all the objects torch
    and transformers made at import, several times a step (perf: ~5 % of a step on both sides).
  - AdamW is torch's with `fused=True` for both (CPU's default is a per-tensor loop: 21 ms vs 4 ms
    per tiny step, the same for both sides, which only dilutes the ratio).
  - `--compile`: nanoseek's decoder blocks under torch.compile (`compile_blocks`, regional; the
    expert dispatch stays eager); each variant's first call minus a steady call is reported as
    `compile_first_call_s_<item>` (inductor caches on disk: a warm cache costs a fraction).

Measured 2026-11-23, this 2-core EPYC (AVX-512, no AMX), quiet machine (other_cpu_load 0.00),
OMP default spinning, 2 threads, torch 2.13, `nanoseek bench model --preset P [--compile] --json`;
the machine stays noisy when quiet (the fp32 peak read 153–195 GFLOP/s from run to run), so ranges:

  preset, mode     runs  train fp32 ×        best (bf16) ×   prefill fp32 ×   MFU fp32     MFU best
  tiny  eager        6   1.14–1.37 (med 1.21) 1.73–1.89       1.19–1.38        0.59–0.70    0.36–0.43
  tiny  --compile    3   1.22–1.26            1.84–1.92       1.22–1.29        0.57–0.60    0.38–0.43
  small eager        2   1.26, 1.26           1.86, 1.86      1.24, 1.33       0.56, 0.61   0.39, 0.41
  small --compile    2   1.30, 1.31           1.95, 2.00      1.21, 1.23       0.61, 0.65   0.40, 0.42
Tokens/s, tiny eager: nanoseek 8,500–9,100 fp32 and 12,900–13,900 bf16 against transformers'
7,000–7,500 fp32 (cpu_facts §3: 6,700–7,400) and 8,200–8,600 bf16; small: 2,370 / 3,500 against
1,880 / 2,130. bf16 vs transformers' bf16: 1.56–1.63 (tiny), 1.64–1.69 (small). Compile first
calls: tiny 18 / 18 / 6 / 9 s (train fp32, train bf16, prefill fp32, prefill bf16) after a code
change, 2–7 s with a warm inductor cache; small 29 / 29 / 11 / 9 s, then 2–6 s. With one other
process at 100 % of a core (PASSIVE): tiny fp32 1.16–1.22, best 1.84.

Where the time goes (torch.profiler, 5 tiny fp32 training steps, self CPU time): aten::mm 36 %
(weight gradients on MKL, grouped expert GEMMs), mkldnn::_linear_pointwise 24 % (forward and dX
GEMMs, layers.linear), aten::bmm 9 % + baddbmm 2 % (attention), mul 4.7 %, cat 1.7 %, add 1.4 %,
copy_ 1.3 %, fill_ 1.3 %, log_softmax fwd+bwd 2 % (the loss), softmax 1 %, silu_backward 0.9 %,
fused AdamW 0.9 %, index_select 0.8 %. GEMMs are 71 % of the step and run at 160–210 GFLOP/s, the
1024³ peak: fp32 is GEMM-bound, and what is left is ~1,500 small ops per step at memory speed plus
the serial dispatch between them (perf: 12 % of the second thread's time waits in libgomp). That
bounds the fp32 ratio near 1.2 in eager mode: transformers runs the same GEMMs (its extra cost is
the SDPA math path over [B, H, T, T], the [T, T] masked half, and more small ops), so removing
all of our non-GEMM time would give at most ~1.6×. bf16 (GEMMs at ~2× the fp32 rate) is where the
real gain is; its MFU is lower because autocast's casts (copy_ 9 % of a bf16 step) and the same
elementwise work weigh more next to faster GEMMs.
"""
from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from nanoseek.bench.common import cpu_jiffies, omp_wait, other_cores, report
from nanoseek.train.flops import flops_per_token
from nanoseek.checkpoint import save_pretrained
from nanoseek.config import preset
from nanoseek.model import Transformer
from nanoseek.model.params import param_counts


def add_arguments(p) -> None:
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small)")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    p.add_argument("--reps", type=int, default=7, help="timed rounds (medians are reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--omp-wait", choices=["auto", "passive", "keep"], default="auto",
                   help="OMP_WAIT_POLICY: passive (re-executes the command with it set), keep the environment's, "
                        "or auto = passive when other processes use >= 0.25 of a core at the start")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile nanoseek's decoder blocks (each variant's first call is reported)")
    p.add_argument("--only", default=None, help="comma-separated subset of the timed items (debugging)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# ------------------------------------------------------------------ the two models and what is timed
def build_pair(cfg, seed: int):
    """nanoseek's model and transformers' model loaded from its save_pretrained directory."""
    import transformers

    torch.manual_seed(seed)
    ours = Transformer(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).train()
    return ours, theirs


def parity(ours, theirs, ids) -> float:
    with torch.no_grad():
        a, b = theirs(ids, use_cache=False).logits, ours(ids, mtp=False).logits
    return float((a - b).abs().max() / max(1.0, float(a.abs().max())))


def next_token_loss(logits, ids):
    """Mean cross-entropy of position i's logits against token i+1 (the last position has no target:
    ignored, which spares the copy a logits[:, :-1] slice would make)."""
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def train_step_fn(model, forward, ids, bf16: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = next_token_loss(forward(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def prefill_fn(forward, ids, bf16: bool):
    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            forward(ids)
    return run


def peak_fn(dtype, n: int = 1024):
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return lambda: a @ b


def timed_items(ours, theirs, ids) -> dict:
    ours_fwd = lambda x: ours(x, mtp=False).logits            # noqa: E731
    theirs_fwd = lambda x: theirs(x, use_cache=False).logits  # noqa: E731
    items = {"peak_fp32": peak_fn(torch.float32), "peak_bf16": peak_fn(torch.bfloat16)}
    for prec in ("fp32", "bf16"):
        bf16 = prec == "bf16"
        items[f"nanoseek_train_{prec}"] = train_step_fn(ours, ours_fwd, ids, bf16)
        items[f"transformers_train_{prec}"] = train_step_fn(theirs, theirs_fwd, ids, bf16)
    for prec in ("fp32", "bf16"):
        items[f"nanoseek_prefill_{prec}"] = prefill_fn(ours_fwd, ids, prec == "bf16")
        items[f"transformers_prefill_{prec}"] = prefill_fn(theirs_fwd, ids, prec == "bf16")
    return items


def compile_blocks(model) -> None:
    """Regional torch.compile: each decoder block in place (blocks of one kind share compiled code;
    the expert dispatch runs eager inside, moe.experts_grouped)."""
    for block in model.layers:
        block.compile()


def first_call_seconds(fn) -> float:
    """Time of fn's first call minus a steady call: what compiling added."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    return first - (time.perf_counter() - t0)


# ------------------------------------------------------------------ timing on a shared machine
def time_rounds(items: dict, reps: int, warmup: int) -> tuple[dict[str, list[float]], float]:
    """Every item once per round, in turn: seconds per item per timed round, median other load."""
    for _ in range(warmup):
        for fn in items.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in items}
    loads = []
    for _ in range(reps):
        for name, fn in items.items():
            j0, t0 = cpu_jiffies(), time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            loads.append(other_cores(j0, cpu_jiffies(), dt))
    return times, statistics.median(loads) if loads else 0.0


# ------------------------------------------------------------------ figures
def summarize(times: dict, cfg, tokens: int, seq_len: int) -> tuple[dict, dict]:
    """Tokens/s, peaks, MFU and the ratios (> 1: nanoseek faster) from per-item timings."""
    sec = {k: statistics.median(v) for k, v in times.items()}
    peak = {p: 2 * 1024 ** 3 / sec[f"peak_{p}"] / 1e9 for p in ("fp32", "bf16")}
    figures: dict = {"peak_gflops_fp32": peak["fp32"], "peak_gflops_bf16": peak["bf16"]}
    tps = {k: tokens / s for k, s in sec.items() if not k.startswith("peak")}
    figures.update({f"{k}_tokens_per_s": v for k, v in tps.items()})
    flops = {"train": flops_per_token(cfg, seq_len, True), "prefill": flops_per_token(cfg, seq_len, False)}
    for name, v in tps.items():
        side, kind, prec = name.split("_")
        figures[f"mfu_{name}"] = flops[kind] * v / (peak[prec] * 1e9)
    ratios = {}
    if "nanoseek_train_fp32" in tps and "transformers_train_fp32" in tps:
        best = max(("fp32", "bf16"), key=lambda p: tps.get(f"nanoseek_train_{p}", 0.0))
        figures.update(mfu_fp32=figures["mfu_nanoseek_train_fp32"], mfu_best=figures[f"mfu_nanoseek_train_{best}"],
                       best_precision=best)
        ratios["train_step_fp32_vs_transformers_fp32"] = tps["nanoseek_train_fp32"] / tps["transformers_train_fp32"]
        ratios["train_step_best_vs_transformers_fp32"] = tps[f"nanoseek_train_{best}"] / tps["transformers_train_fp32"]
    for kind, key in (("train", "train_step"), ("prefill", "prefill")):
        for prec in ("fp32", "bf16"):
            a, b = f"nanoseek_{kind}_{prec}", f"transformers_{kind}_{prec}"
            if a in tps and b in tps:
                ratios[f"{key}_{prec}_vs_transformers_{prec}"] = tps[a] / tps[b]
    return figures, ratios


# ------------------------------------------------------------------ main
def main(args) -> int:
    omp_wait(args.omp_wait, "model")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset, num_nextn_predict_layers=0)
    B, T = args.batch, args.seq_len
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(args.seed))
    ours, theirs = build_pair(cfg, args.seed)
    figures: dict = {"parity_max_rel_diff": parity(ours, theirs, ids)}
    items = timed_items(ours, theirs, ids)
    if args.only:
        keep = set(args.only.split(",")) | {"peak_fp32", "peak_bf16"}
        items = {k: v for k, v in items.items() if k in keep}
    if args.compile:
        compile_blocks(ours)
        for name in [k for k in items if k.startswith("nanoseek_")]:
            figures[f"compile_first_call_s_{name.removeprefix('nanoseek_')}"] = first_call_seconds(items[name])
    gc.collect()
    gc.freeze()
    times, load = time_rounds(items, args.reps, args.warmup)
    more, ratios = summarize(times, cfg, B * T, T)
    figures.update(more, other_cpu_load=load)
    n = param_counts(cfg)["activated"] - cfg.vocab_size * cfg.hidden_size
    config = {"preset": args.preset, "batch": B, "seq_len": T, "threads": torch.get_num_threads(),
              "reps": args.reps, "warmup": args.warmup, "mtp": False, "optimizer": "torch AdamW fused",
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "compile": args.compile,
              "activated_params_non_embedding": n, "train_flops_per_token": flops_per_token(cfg, T, True),
              "prefill_flops_per_token": flops_per_token(cfg, T, False), "torch": torch.__version__}
    report("model", config, figures, ratios, args.json)
    return 0

"""`nanoseek bench engine`: the engine against transformers' `generate`, on the same weights.

The engine runs its compiled decode steps (engine/graphs.py; --no-compile: the eager engine);
`compile_seconds` is what compiling cost this run (inductor's on-disk cache makes a second run's
much smaller).

Figures (--reps rounds, interleaved ours/theirs in alternating order so load from other jobs hits
both; tokens/s from median times, ratios as the median of per-round paired ratios):
  decode     tokens/s at batch 1 and 16: 16-token prompts, 64 new tokens forced (ignore_eos /
             min_new_tokens), greedy, prefill included, vs `AutoModelForCausalLM.generate` on the
             checkpoint the engine loaded (transformers' DeepseekV3 with its DynamicCache).
  prefix     TTFT of a request whose ~2k-token prefix is cached vs the same request after
             `clear_prefix_cache()` (the miss computes all of it in one chunk).
  kv bytes   cached bytes per token: MLA's latent + rope key vs the same model's per-head K and V.
  MTP        greedy decode with --spec-tokens MTP drafts per step (1) vs without, both engines alike (compiled
             unless --no-compile), at batch 1 (8 prompts in turn) and batch 8 (together):
             acceptance = accepted / proposed drafts, speed-up = tokens/s ratio; outputs must be
             identical. `spec_oracle_speedup_batch1`: the same engine at batch 1 with perfect drafts
             that cost nothing (ReplayDrafter, the plain run's own tokens): the ceiling of any
             drafter at this many drafts, set by what verifying them costs. Needs a trained MTP module (random heads accept ~nothing): without --model
             the bench first pretrains the tiny preset for --train-steps (8×128 tokens each) on
             synthetic, highly regular text (random-order verses, `synthetic_doc`) with the MTP loss
             (λ = 0.3), and uses those weights for every figure; the output says which it used.
Threads default to 1: on the shared 2-core machine, 2 torch threads collapse whenever another job
runs (spinning workers; the pretraining took 200 s instead of 37 s, decode ran 6× slower), and
at these sizes a second thread gains little even when the machine is idle.
"""
from __future__ import annotations

import math
import random
import statistics
import sys
import tempfile
import time

import torch

from nanoseek.bench.common import report

WORDS = ("the red fox runs over a hill and the blue bird sings to one small cat while old "
         "trees grow near cold water in green fields").split()
_r = random.Random(123)
VERSES = [" ".join(_r.choice(WORDS) for _ in range(_r.randrange(6, 12))) + "." for _ in range(16)]


def add_arguments(p):
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "r1_distill_qwen_1p5b"],
                   help="tiny / small: a V3 model pretrained here on synthetic text (all figures); "
                        "r1_distill_qwen_1p5b: random bf16 weights in the 1.5B distill's shape, decode only, "
                        "against transformers and the memory-bandwidth limit")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the engine's eager decode (the reference) instead of its compiled decode steps")
    p.add_argument("--model", help="checkpoint directory with a trained MTP module (default: pretrain tiny here)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per figure (median)")
    p.add_argument("--train-steps", type=int, default=120, help="pretraining steps when no --model is given")
    p.add_argument("--prefix-tokens", type=int, default=2000, help="shared prefix length for the TTFT figure")
    p.add_argument("--spec-tokens", type=int, default=1,
                   help="MTP drafts per step (small at batch 1: 1 gave 1.08-1.18x, 2 gave 1.03-1.20x, where perfect "
                        "free drafts give 1.40-1.55x and 1.73-1.92x; tiny: 2 gave 0.86x at acceptance 0.67)")
    p.add_argument("--save-model", default=None, help="also save the pretrained checkpoint here (reuse with --model)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; see the docstring)")


# ------------------------------------------------------------------ synthetic pretraining
def synthetic_doc(rng: random.Random) -> str:
    """Twelve of 16 fixed random-word verses in random order: fully regular inside a verse, a
    1-in-16 guess between verses (the "highly regular text" a drafter is measured on)."""
    return " ".join(rng.choice(VERSES) for _ in range(12))


def pretrain(steps: int, log, preset: str = "tiny") -> tuple:
    """A V3 preset (MTP depth 1) trained on synthetic_doc text with CE + 0.3 · MTP loss."""
    from nanoseek.config import preset as get_preset
    from nanoseek.model import Transformer
    from nanoseek.model.mtp import mtp_loss
    from nanoseek.tokenizer import train_tokenizer
    rng = random.Random(0)
    tok = train_tokenizer([synthetic_doc(rng) for _ in range(3000)], vocab_size=1024)
    stream: list[int] = []
    torch.manual_seed(0)
    model = Transformer(get_preset(preset, vocab_size=1024)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    B, T, t0 = 8, 128, time.perf_counter()
    for step in range(steps):
        while len(stream) < B * T:
            stream += [tok.bos_id] + tok.encode(synthetic_doc(rng)) + [tok.eos_id]
        ids = torch.tensor(stream[:B * T]).view(B, T)
        del stream[:B * T]
        lr = 3e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(ids, mtp=True)
        main = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        extra, per_depth = mtp_loss(out.mtp_logits, ids, weight=0.3)
        opt.zero_grad(set_to_none=True)
        (main + extra).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            log(f"  pretrain step {step:4d}  loss {main.item():.3f}  mtp {per_depth[0].item():.3f}  "
                f"{time.perf_counter() - t0:.0f}s")
    return model.eval(), tok, f"pretrained here: {preset}, {steps} steps x {B}x{T} synthetic tokens, MTP λ=0.3"


# ------------------------------------------------------------------ measurements
def interleaved(fns: dict, reps: int) -> dict:
    """Seconds of each fn over `reps` rounds (one warm-up each), run round-robin so that load from
    other jobs falls on all of them; `paired` turns two of them into a ratio."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for r in range(reps):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def paired(times: dict, slow: str, fast: str) -> float:
    """Median over rounds of slow/fast time: robust to load that changes between rounds."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def decode_figures(llm, hf, vocab: int, reps: int, batches=(1, 16), new_tokens: int = 64,
                   decode_only: bool = False) -> dict:
    """tokens/s of both sides at each batch size, prefill included. decode_only: also time each side
    making 1 token (prefill + 1) and report the rate of the other new_tokens - 1 tokens,
    (new_tokens - 1) / (t(new_tokens) - t(1)): the decode step alone, what a memory-bandwidth limit
    speaks about (a bf16 prefill of 16 tokens is GEMM-bound here, and would hide it)."""
    from nanoseek.engine import SamplingParams
    out = {}
    for B in batches:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(10, vocab, (B, 16), generator=g)
        got = {}

        def ours(n=new_tokens):
            llm.clear_prefix_cache()
            sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            got["ours" if n == new_tokens else "ours1"] = [o[0].token_ids for o in llm.generate(prompts.tolist(), sp)]

        def theirs(n=new_tokens):
            ids = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)
            got["hf" if n == new_tokens else "hf1"] = ids[:, prompts.shape[1]:].tolist()
        fns = {"ours": ours, "hf": theirs}
        if decode_only:
            fns.update(ours1=lambda: ours(1), hf1=lambda: theirs(1))
        t = interleaved(fns, reps)
        out[f"decode_b{B}_tok_s"] = B * new_tokens / statistics.median(t["ours"])
        out[f"decode_b{B}_tok_s_transformers"] = B * new_tokens / statistics.median(t["hf"])
        out[f"decode_b{B}_paired_ratio"] = paired(t, "hf", "ours")
        if decode_only:
            for side, key in (("ours", ""), ("hf", "_transformers")):
                step = statistics.median(a - b for a, b in zip(t[side], t[side + "1"])) / (new_tokens - 1)
                out[f"decode_only_b{B}_tok_s{key}"] = B / step
        # greedy on the same weights: the share of sequences whose tokens agree with transformers'
        # (random bf16 weights give near-tied logits: see main_1p5b)
        out[f"decode_b{B}_same_tokens"] = sum(a == b for a, b in zip(got["ours"], got["hf"])) / B
        out[f"decode_b{B}_same_first_token"] = sum(a[0] == b[0] for a, b in zip(got["ours"], got["hf"])) / B
    return out


def memory_bandwidth(seconds: float = 1.0) -> float:
    """Bytes per second this thread reads from memory: a 1 GiB tensor (far beyond the caches) summed
    by gemv.c's nanoseek_read in 1, 2, 4 and 8 streams side by side, the fastest (median of passes
    each); the speed limit of a decode step that must read every weight once. One stream is what
    torch's x.sum() reads (~9.4 GB/s here); four read ~18: a core keeps more lines in flight, and the
    decode kernels read several streams too (the bf16 kernel at 1.5B read ~12 GB/s, past a limit
    measured with x.sum()). Without the C kernel: x.sum()."""
    from nanoseek.model import gemv
    x = torch.ones(1 << 28, dtype=torch.float32)           # 1 GiB
    readers = {"sum": lambda: x.sum()}
    if gemv.load():
        readers = {s: (lambda s=s: gemv.lib().nanoseek_read(x.data_ptr(), x.numel(), s)) for s in (1, 2, 4, 8)}
    best = 0.0
    for read in readers.values():
        read()
        times = []
        t_end = time.perf_counter() + seconds / len(readers)
        while len(times) < 3 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            read()
            times.append(time.perf_counter() - t0)
        best = max(best, x.numel() * x.element_size() / statistics.median(times))
    return best


def rss_bytes() -> int:
    """Peak resident memory of this process."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main_1p5b(args, log) -> int:
    """Issue 13's laptop-sized check: a transformers-written Qwen2 directory shaped like
    DeepSeek-R1-Distill-Qwen-1.5B, random bf16 weights, 16-token prompts, 24 greedy tokens at
    batch 1 and 8, the engine vs transformers' generate on the same weights and dtype, and against
    the physical limit: weight bytes read per token / memory bandwidth measured in this run."""
    import transformers
    from nanoseek.config import preset
    from nanoseek.engine import LLM
    from nanoseek.model import param_counts
    cfg = preset("r1_distill_qwen_1p5b")
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, torch_dtype="bfloat16")
    log("building random bf16 weights (1.78B parameters) with transformers …")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        llm = LLM(d, block_size=16, max_num_seqs=8, compile=args.compile, log=log)
    params = param_counts(llm.model.config)["total"]
    weight_bytes = (params - cfg.vocab_size * cfg.hidden_size) * 2      # the embedding reads one row a token
    log("memory bandwidth …")
    bandwidth = memory_bandwidth()
    log("decode …")
    with torch.inference_mode():
        figures = decode_figures(llm, hf, cfg.vocab_size, args.reps, batches=(1, 8), new_tokens=24, decode_only=True)
        # agreement on the logits themselves: with random bf16 weights the top-2 logits of a 28-layer
        # model are often within bf16's rounding of each other, so greedy tokens can part ways
        # without anything being wrong; these say by how much the two sides' logits differ
        prompt = torch.randint(10, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7))
        theirs = hf(prompt).logits[0, -1].float()
        ours = llm.model(prompt).logits[0, -1].float()
        top2 = theirs.topk(2).values
    limit = bandwidth / weight_bytes
    figures.update(memory_bandwidth_gb_s=bandwidth / 1e9, weight_gb_read_per_token=weight_bytes / 1e9,
                   bandwidth_limit_tok_s=limit, peak_rss_gb=rss_bytes() / 1e9,
                   compile_seconds=llm.compile_seconds or 0.0,
                   last_logits_max_abs_diff=float((ours - theirs).abs().max()),
                   last_logits_top2_gap=float(top2[0] - top2[1]),
                   last_logits_same_argmax=float(ours.argmax() == theirs.argmax()))
    ratios = {
        "decode_batch1_vs_transformers": figures.pop("decode_b1_paired_ratio"),
        "decode_batch8_vs_transformers": figures.pop("decode_b8_paired_ratio"),
        "decode_batch1_of_bandwidth_limit": figures["decode_only_b1_tok_s"] / limit,
        "transformers_batch1_of_bandwidth_limit": figures["decode_only_b1_tok_s_transformers"] / limit,
        "decode_batch1_with_prefill_of_bandwidth_limit": figures["decode_b1_tok_s"] / limit,
    }
    config = {"preset": "r1_distill_qwen_1p5b", "dtype": "bfloat16", "reps": args.reps,
              "threads": torch.get_num_threads(), "compile": args.compile,
              "transformers": transformers.__version__}
    report("engine", config, figures, ratios, args.json)
    return 0


def ttft_figures(llm, tok, prefix_tokens: int, reps: int) -> dict:
    from nanoseek.engine import SamplingParams
    rng = random.Random(1)
    text = " ".join(synthetic_doc(rng) for _ in range(prefix_tokens // 50))
    prefix = tok.encode(text)[:prefix_tokens]
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    suffix = iter(range(10 ** 6))

    def ttft(clear: bool) -> float:
        if clear:
            llm.clear_prefix_cache()
        ids = prefix + tok.encode(f" question {next(suffix)}: 12+34=")
        t0 = time.perf_counter()
        llm.generate([ids], sp)
        return time.perf_counter() - t0
    ttft(True)
    ttft(False)
    miss, hit = [], []
    for _ in range(reps):
        miss.append(ttft(True))
        hit.append(ttft(False))
    return {"ttft_miss_ms": 1e3 * statistics.median(miss), "ttft_hit_ms": 1e3 * statistics.median(hit),
            "prefix_tokens": len(prefix)}


class ReplayDrafter:
    """The ceiling of any drafter, for `mtp_figures`: drafts a greedy run's own next tokens (known
    from a plain run of the same prompt), so every draft is accepted, and costs no model pass. In
    place of an engine's MTPDrafter it leaves the MTP cache unwritten: its engine's prefix cache must
    be cleared before the MTP drafter runs again (mtp_figures clears it before every generate)."""

    def __init__(self, num_tokens: int, continuations: dict[tuple, list[int]]):
        """continuations: prompt token ids -> the tokens greedy decoding emits after them."""
        self.k, self.full = num_tokens, {p: list(p) + list(c) for p, c in continuations.items()}

    def step(self, items: list[tuple], drafting: list[bool]) -> None:
        for (seq, _rows, _nc_old), d in zip(items, drafting):
            L = seq.num_computed
            seq.mtp_len, seq.last_hidden, seq.draft_probs = L + 1, None, None
            seq.draft = self.full[tuple(seq.request.prompt_token_ids)][L + 1:L + 1 + self.k] if d else []


def mtp_figures(model, tok, spec_tokens: int, reps: int, batch: int = 8, **engine_kw) -> dict:
    """Batch 1: each of 8 prompts in turn, plain then speculative (order alternating), reps rounds;
    then the 8 prompts as one batch, the same way. Both engines alike (compiled or not). At batch 1
    the speculative engine also runs with a ReplayDrafter in place of its MTP drafter (`oracle`):
    perfect drafts at no cost, the most any drafter could gain at this many drafts over what
    verifying them costs (`spec_oracle_speedup_batch1`)."""
    from nanoseek.engine import LLM, SamplingParams
    rng = random.Random(2)
    prompts = [tok.encode(synthetic_doc(rng))[:24] for _ in range(batch)]
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    engines = {"plain": LLM(model, tok, **engine_kw), "spec": LLM(model, tok, speculative_tokens=spec_tokens, **engine_kw)}
    mtp = engines["spec"].drafter
    replay = ReplayDrafter(spec_tokens, {tuple(p): o[0].token_ids
                                         for p, o in zip(prompts, engines["plain"].generate(prompts, sp))})
    proposed = accepted = 0
    out, same = {}, True
    for name, groups in (("batch1", [[p] for p in prompts]), (f"batch{batch}", [prompts])):
        kinds = ["plain", "spec", "oracle"] if name == "batch1" else ["plain", "spec"]
        times = {k: [] for k in kinds}
        for r in range(reps + 1):                                   # round 0 warms up
            for group in groups:
                got = {}
                for kind in (kinds if r % 2 else kinds[::-1]):
                    e = engines["plain" if kind == "plain" else "spec"]
                    if kind != "plain":
                        e.drafter = replay if kind == "oracle" else mtp
                    e.clear_prefix_cache()
                    c0 = dict(e.counters)
                    t0 = time.perf_counter()
                    got[kind] = [o[0].token_ids for o in e.generate(group, sp)]
                    if r:
                        times[kind].append(time.perf_counter() - t0)
                    if kind == "spec":
                        proposed += e.counters["spec_proposed"] - c0["spec_proposed"]
                        accepted += e.counters["spec_accepted"] - c0["spec_accepted"]
                same &= all(g == got["plain"] for g in got.values())
        engines["spec"].drafter = mtp
        n = 64 * len(groups[0])
        out[f"spec_tok_s_{name}"] = n / statistics.median(times["spec"])
        out[f"plain_tok_s_{name}"] = n / statistics.median(times["plain"])
        out[f"spec_paired_speedup_{name}"] = paired(times, "plain", "spec")
        if "oracle" in times:
            out[f"spec_oracle_speedup_{name}"] = paired(times, "plain", "oracle")
    out.update(mtp_acceptance=accepted / max(proposed, 1), spec_identical=float(same),
               compile_seconds_spec=engines["spec"].compile_seconds or 0.0)
    return out


# ------------------------------------------------------------------ main
def main(args) -> int:
    import transformers
    from nanoseek import load_pretrained, save_pretrained
    from nanoseek.engine import LLM
    from nanoseek.engine.loading import load_tokenizer
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    if args.preset == "r1_distill_qwen_1p5b":
        return main_1p5b(args, log)
    if args.model:
        model, tok, source = load_pretrained(args.model).eval(), load_tokenizer(args.model), f"loaded {args.model}"
    else:
        model, tok, source = pretrain(args.train_steps, log, args.preset)
        if args.save_model:
            save_pretrained(model, args.save_model, tokenizer=tok)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d, tokenizer=tok)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    cfg = model.config
    engine_kw = dict(block_size=16, max_num_batched_tokens=4096)
    # capture sizes: the batch sizes measured here (a server would take graphs.DEFAULT_SIZES)
    llm = LLM(model, tok, compile=args.compile, compile_sizes=(1, 8, 16), log=log, **engine_kw)
    log("decode ...")
    with torch.inference_mode():
        figures = decode_figures(llm, hf, cfg.vocab_size, args.reps)
    log("prefix TTFT ...")
    figures.update(ttft_figures(llm, tok, args.prefix_tokens, args.reps))
    mha = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    figures.update(kv_bytes_per_token_mla=llm.cache.bytes_per_token(), kv_bytes_per_token_mha=mha)
    log("MTP speculative decoding ...")
    figures.update(mtp_figures(model, tok, args.spec_tokens, args.reps, compile=args.compile,
                               compile_sizes=(1, 8), log=log, **engine_kw))
    ratios = {
        "decode_batch1_vs_transformers": figures.pop("decode_b1_paired_ratio"),
        "decode_batch16_vs_transformers": figures.pop("decode_b16_paired_ratio"),
        "prefix_hit_vs_miss_ttft": figures["ttft_miss_ms"] / figures["ttft_hit_ms"],
        "spec_mtp_speedup_batch1": figures.pop("spec_paired_speedup_batch1"),
        "spec_mtp_speedup_batch8": figures.pop("spec_paired_speedup_batch8"),
        "spec_oracle_speedup_batch1": figures.pop("spec_oracle_speedup_batch1"),
        "kv_bytes_mha_vs_mla": mha / figures["kv_bytes_per_token_mla"],
    }
    figures["compile_seconds"] = llm.compile_seconds or 0.0
    config = {"model": source, "preset": args.preset if not args.model else cfg.model_type, "reps": args.reps,
              "compile": args.compile,
              "threads": torch.get_num_threads(), "spec_tokens": args.spec_tokens, "dtype": str(next(model.parameters()).dtype),
              "transformers": transformers.__version__}
    report("engine", config, figures, ratios, args.json)
    return 0

"""`nanoseek bench serve`: `nanoseek serve` under load over loopback, and the same work in-process.

What it runs. Our server in a child process (`python -m nanoseek serve` on 127.0.0.1, a free port,
`--threads` torch threads), and an async httpx client here that streams chat completions with
`stream_options.include_usage` and times every chunk, the way vLLM's benchmark_serving.py does
(serving.md §5.1): requests of `--prompt-words` random words, `--output-tokens` new tokens each
(`ignore_eos`, vLLM's extension, so every request does the same work), T = 0.6, top-p 0.95, a
seed per request. Workloads, each on fresh prompts (nothing hits the prefix cache by accident):
  rate R     --requests Poisson arrivals at R requests/s (exponential gaps, seeded), no cap on
             concurrency: what an open system of users sees, queueing included;
  conc C     --requests sent by C workers, each starting its next request when one ends
             (`--max-concurrency` in vLLM): the throughput / latency trade-off of batch size;
  prefix     --prefix-requests questions after one shared document of --prefix-tokens words, by
             --prefix-concurrency workers, against the same shape with a new document each
             (`prefix_miss`): the cache hit rate from usage.prompt_cache_hit_tokens / prompt_tokens,
             and TTFT of the requests that hit vs those of the all-miss twin;
  overhead   --reps rounds of the largest concurrency's batch, all at once over HTTP and through
             `LLM.generate` in this process (same weights, prompts, seeds and engine settings),
             alternating which goes first: the share of the engine's throughput the server keeps.
Figures per workload (prefix `rate4_`, `conc16_`, …), as serving.md §6.5 defines them:
  ttft   send -> first token of either channel (the first non-empty reasoning_content or
         content delta; DeepSeek streams the reasoning first, so this is "started answering");
  ttfa   send -> first answer (content) token: after `</think>`; over requests that got there
         (`answered` is their share: a request cut by max_tokens inside the reasoning has none);
  tpot   (latency - ttft) / (output tokens - 1), output = usage.completion_tokens, reasoning
         tokens included (they are generated and billed alike, §1.6);
  itl    gaps between successive chunks that carry text, pooled over requests;
  req_s, output_tok_s over the workload's wall time (first send to last byte), `errors` = non-200
  answers, in-band error events, streams without `data: [DONE]`, client exceptions.
p50 / p99 by linear interpolation; with few requests p99 is close to the maximum.
Ratios (> 1: better): prefix_hit_vs_miss_ttft = miss p50 / hit p50 TTFT; server_vs_engine_throughput
= HTTP output tok/s / in-process output tok/s (median of per-round pairs; < 1: what HTTP, SSE,
JSON and the engine thread cost, engine_loop.py).

The model. Without --model, the tiny preset (MTP off) trained here for --train-steps on chat
conversations whose replies reason ("<think>\nlet me think step by step. " + two of 16 fixed
verses), close `</think>` and answer (one verse): a random model never closes `</think>`, so it
would have no time to first answer. 50 steps (~20 s here) give replies that reason for ~20-28
tokens, then answer: in the default workloads every reply reached its answer within 48 tokens
(`answered` 1.0) and 45-53 % of the output tokens were reasoning. --model DIR benchmarks any
checkpoint (the prompts are random English words whatever its tokenizer); --save-model keeps the
trained one.

Measured (2026-11-30; 2 cores shared with a pretraining run using ~1.7 of them, everything here at
nice 19, 1 torch thread on each side): `nanoseek bench serve --json` twice, 84 s and 92 s; prompts
~60 tokens (48 words), 48 output tokens, 20 requests per workload, 0 errors in either run.
    workload   req/s      output tok/s  TTFT p50 / p99 ms    TTFA p50 ms  TPOT p50 / p99 ms  ITL p50 / p99 ms
    rate 2     1.66 1.67    80   80     46 / 60   45 / 69    363  342     13 / 17  13 / 16   13 / 58  13 / 55
    rate 4     3.97 4.10   191  197     53 / 167  74 / 113   482  555     19 / 26  23 / 27   16 / 78  19 / 82
    rate 8     6.03 5.54   289  266     49 / 70   96 / 146   387  686     16 / 18  26 / 36   16 / 69  24 / 114
    conc 1     1.56 1.43    75   69     34 / 43   36 / 42    354  393     13 / 18  15 / 16   13 / 49  14 / 54
    conc 4     5.05 4.64   243  223     69 / 101  81 / 90    395  426     14 / 19  17 / 18   15 / 61  17 / 64
    conc 16    8.39 8.05   403  386    418 / 421 255 / 256   960  825     25 / 27  27 / 28   22 / 100 25 / 102
  Throughput grows 5.4-5.6x from 1 to 16 concurrent streams while TPOT rises 1.9x (continuous
  batching: one decode step serves every running request); 16 arrivals at once share one packed
  prefill of ~1,000 tokens (TTFT 255-418 ms). The time to the first answer token is ~300 ms after the first
  token: ~23 reasoning tokens at the TPOT. Rate 8 asks 384 tok/s, near what the server gives.
  Shared prefix (537-token prompts, 512 shared, 12 requests by 4 workers): hit rate 0.636 both
  times, exactly 8/12 x 512/537 (the first four start together and all miss: blocks enter the
  cache once computed); TTFT of the hits 83 / 110 ms p50 against 600 / 643 ms for the all-miss
  twin: prefix_hit_vs_miss_ttft 7.2 and 5.9. HTTP vs in-process (16 requests at once): 651 / 490
  against 931 / 742 output tok/s, server_vs_engine_throughput 0.70 and 0.63: the event loop's
  SSE and JSON per token and the client share the cores with the engine thread (engine_loop.py
  measured the same split); at this model size the server's Python sets the pace.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from nanoseek.bench.common import report
from nanoseek.bench.loadgen import Result, closed_loop, percentile, poisson, summarize

WORDS = ("the red fox runs over a hill and the blue bird sings to one small cat while old "
         "trees grow near cold water in green fields").split()
_r = random.Random(7)
VERSES = [" ".join(_r.choice(WORDS) for _ in range(_r.randrange(5, 9))) + "." for _ in range(16)]
OPENING = "let me think step by step. "
NAME = "bench"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory to serve (default: train the tiny preset here)")
    p.add_argument("--save-model", default=None, help="also save the trained checkpoint here (reuse with --model)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--train-steps", type=int, default=50, help="training steps of the default model (8x128 tokens)")
    p.add_argument("--requests", type=int, default=20, help="requests per rate and per concurrency workload")
    p.add_argument("--rates", type=_floats, default=[2.0, 4.0, 8.0], help="Poisson request rates, req/s (comma list)")
    p.add_argument("--concurrency", type=_ints, default=[1, 4, 16], help="max-concurrency sweep (comma list)")
    p.add_argument("--prompt-words", type=int, default=48, help="random words per prompt (~1 token each here)")
    p.add_argument("--output-tokens", type=int, default=48, help="new tokens per request (ignore_eos)")
    p.add_argument("--prefix-tokens", type=int, default=512, help="words of the shared document (prefix workload)")
    p.add_argument("--prefix-requests", type=int, default=12, help="requests of the prefix workload and of its twin")
    p.add_argument("--prefix-concurrency", type=int, default=4, help="workers of the prefix workload")
    p.add_argument("--reps", type=int, default=3, help="rounds of the HTTP vs in-process comparison (median)")
    p.add_argument("--block-size", type=int, default=16, help="KV block size (the prefix cache's unit)")
    p.add_argument("--kv-cache-mb", type=int, default=256, help="KV cache memory of the server and the engine")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together at most")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the in-process engine")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, arrivals and sampling")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="the server and the in-process engine with compiled decode steps (engine/graphs.py)")


# ------------------------------------------------------------------ the default model
def conversation(rng: random.Random) -> list[dict]:
    question = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(6, 12))) + "?"
    reasoning = OPENING + " ".join(rng.choice(VERSES) for _ in range(2))
    reply = "<think>\n" + reasoning + "\n</think>\n\n" + rng.choice(VERSES)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def train_model(steps: int, log):
    """The tiny preset trained on reason-then-answer conversations (see the top)."""
    import torch

    from nanoseek.config import tiny
    from nanoseek.model import Transformer
    from nanoseek.tokenizer import train_tokenizer
    rng = random.Random(0)
    tok = train_tokenizer([conversation(rng)[0]["content"] + " " + OPENING + " ".join(VERSES) for _ in range(500)],
                          vocab_size=400)
    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=tok.vocab_size).replace(num_nextn_predict_layers=0)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, betas=(0.9, 0.95), weight_decay=0.0)
    B, T, stream, t0 = 8, 128, [], time.perf_counter()
    for step in range(steps):
        while len(stream) < B * T:
            stream += tok.encode_conversation(conversation(rng))[0]
        ids = torch.tensor(stream[:B * T]).view(B, T)
        del stream[:B * T]
        for g in opt.param_groups:
            g["lr"] = 4e-3 * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        logits = model(ids, mtp=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log(f"  train step {step:3d}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f}s")
    return model.eval(), tok, f"trained here: tiny, {steps} steps x {B}x{T} tokens of reason-then-answer chats"


# ------------------------------------------------------------------ the server, in a child process
class ServerProcess:
    """`python -m nanoseek serve` on 127.0.0.1 and a free port; stopped with SIGINT (its clean exit)."""

    def __init__(self, model_dir: str, args, log_path: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", model_dir, "--port", str(self.port),
               "--served-model-name", NAME, "--log-level", "warning", "--max-queue", "100000",
               "--shutdown-grace-s", "0", "--block-size", str(args.block_size), "--kv-cache-mb", str(args.kv_cache_mb),
               "--max-num-seqs", str(args.max_num_seqs), "--compile" if args.compile else "--no-compile"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), NANOSEEK_API_KEY="")
        self.log_path, self.log = log_path, open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        with open(self.log_path) as f:
            raise RuntimeError(f"nanoseek serve did not come up:\n{f.read()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------ workloads
class Prompts:
    """Fresh random-word chat requests (a new draw each call: nothing repeats across workloads)."""

    def __init__(self, args):
        self.args, self.rng, self.seed = args, random.Random(args.seed), 0

    def words(self, n: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def body(self, content: str) -> dict:
        self.seed += 1
        return {"model": NAME, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.args.output_tokens, "temperature": 0.6, "top_p": 0.95, "seed": self.seed,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    def plain(self, n: int) -> list[dict]:
        return [self.body(self.words(self.args.prompt_words) + "?") for _ in range(n)]

    def shared_prefix(self, n: int, shared: bool) -> list[dict]:
        doc = self.words(self.args.prefix_tokens)
        return [self.body((doc if shared else self.words(self.args.prefix_tokens)) + "\n\nquestion: "
                          + self.words(8) + "?") for _ in range(n)]


def engine_run(llm, tok, bodies: list[dict]) -> tuple[float, int]:
    """The same requests through `LLM.generate` in this process: (seconds, output tokens)."""
    from nanoseek.engine import SamplingParams
    prompts = [tok.apply_chat_template(b["messages"], add_generation_prompt=True) for b in bodies]
    params = [SamplingParams(temperature=b["temperature"], top_p=b["top_p"], max_tokens=b["max_tokens"],
                             seed=b["seed"], ignore_eos=True) for b in bodies]
    llm.clear_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t0, sum(len(c.token_ids) for o in outs for c in o)


async def run_workloads(url: str, args, prompts: Prompts, llm, tok, log) -> tuple[dict, list[Result]]:
    figures, every = {}, []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        warm, _ = await closed_loop(client, prompts.plain(2), 2)             # first-request costs
        every += warm
        for rate in args.rates:
            log(f"rate {rate:g} req/s ...")
            res, s = await poisson(client, prompts.plain(args.requests), rate, args.seed + int(rate * 1000))
            figures.update(summarize(f"rate{rate:g}", res, s))
            every += res
        for c in args.concurrency:
            log(f"concurrency {c} ...")
            res, s = await closed_loop(client, prompts.plain(args.requests), c)
            figures.update(summarize(f"conc{c}", res, s))
            every += res
        log("shared prefix ...")
        hit, _ = await closed_loop(client, prompts.shared_prefix(args.prefix_requests, True), args.prefix_concurrency)
        miss, _ = await closed_loop(client, prompts.shared_prefix(args.prefix_requests, False), args.prefix_concurrency)
        every += hit + miss
        figures.update(prefix_figures(hit, miss))
        log("HTTP vs in-process engine ...")
        n, pairs, http_tps, eng_tps = max(args.concurrency), [], [], []
        for rep in range(args.reps):
            bodies = prompts.plain(n)
            order = ("engine", "http") if rep % 2 == 0 else ("http", "engine")
            for side in order:
                if side == "engine":
                    s, tokens = engine_run(llm, tok, bodies)      # blocks the loop: nothing else runs
                    eng_tps.append(tokens / s)
                else:
                    res, s = await closed_loop(client, bodies, n)
                    every += res
                    http_tps.append(sum(r.output_tokens for r in res if r.ok) / s)
            pairs.append(http_tps[-1] / eng_tps[-1])
        figures.update(overhead_requests=n, http_output_tok_s=statistics.median(http_tps),
                       engine_output_tok_s=statistics.median(eng_tps), server_vs_engine_paired=statistics.median(pairs))
    return figures, every


def prefix_figures(hit: list[Result], miss: list[Result]) -> dict:
    ok_hit, ok_miss = [r for r in hit if r.ok], [r for r in miss if r.ok]
    hitting = [1e3 * r.ttft for r in ok_hit if r.hit_tokens > 0]
    missing = [1e3 * r.ttft for r in ok_miss]
    return {"prefix_prompt_tokens_mean": statistics.fmean(r.prompt_tokens for r in ok_hit) if ok_hit else None,
            "prefix_hit_rate": sum(r.hit_tokens for r in ok_hit) / max(sum(r.prompt_tokens for r in ok_hit), 1),
            "prefix_requests_hit": len(hitting), "prefix_miss_workload_hit_rate":
                sum(r.hit_tokens for r in ok_miss) / max(sum(r.prompt_tokens for r in ok_miss), 1),
            "prefix_hit_ttft_p50_ms": percentile(hitting, 50), "prefix_hit_ttft_p99_ms": percentile(hitting, 99),
            "prefix_miss_ttft_p50_ms": percentile(missing, 50), "prefix_miss_ttft_p99_ms": percentile(missing, 99),
            "prefix_errors": len(hit) + len(miss) - len(ok_hit) - len(ok_miss)}


# ------------------------------------------------------------------ main
def table(figures: dict, args) -> str:
    """The workloads for people: one row each."""
    names = [f"rate{r:g}" for r in args.rates] + [f"conc{c}" for c in args.concurrency]
    cols = ("req_s", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "ttfa_p50_ms", "tpot_p50_ms", "tpot_p99_ms",
            "itl_p50_ms", "itl_p99_ms", "errors")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"              # noqa: E731
    lines = [f"  {'workload':<10}" + "".join(f"{c.removesuffix('_ms'):>13}" for c in cols)]
    for n in names:
        lines.append(f"  {n:<10}" + "".join(f"{fmt(figures[f'{n}_{c}']):>13}" for c in cols))
    return "\n".join(lines)


def main(args) -> int:
    import torch

    from nanoseek import load_pretrained, save_pretrained
    from nanoseek.engine import LLM
    from nanoseek.engine.loading import load_tokenizer
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir, source = args.model, f"loaded {args.model}"
            model, tok = load_pretrained(model_dir).eval(), load_tokenizer(model_dir)
        else:
            log("training the tiny model ...")
            model, tok, source = train_model(args.train_steps, log)
            model_dir = args.save_model or os.path.join(tmp, "model")
            save_pretrained(model, model_dir, tokenizer=tok)
        server = ServerProcess(model_dir, args, os.path.join(tmp, "serve.log"))
        try:
            llm = LLM(model, tok, block_size=args.block_size, kv_cache_memory=args.kv_cache_mb << 20,
                      max_num_seqs=args.max_num_seqs, compile=args.compile)
            server.wait_ready()
            log(f"server up on {server.url}")
            figures, every = asyncio.run(run_workloads(server.url, args, Prompts(args), llm, tok, log))
        finally:
            server.stop()
    ok = [r for r in every if r.ok]
    figures["errors"] = len(every) - len(ok)
    figures["prompt_tokens_mean"] = statistics.fmean(r.prompt_tokens for r in ok) if ok else None
    figures["seconds"] = time.perf_counter() - t_start
    hit, miss = figures["prefix_hit_ttft_p50_ms"], figures["prefix_miss_ttft_p50_ms"]
    ratios = {"prefix_hit_vs_miss_ttft": miss / hit if hit and miss else None,
              "server_vs_engine_throughput": figures.pop("server_vs_engine_paired")}
    config = {"model": source, "threads": args.threads, "compile": args.compile, "requests": args.requests,
              "rates": args.rates,
              "concurrency": args.concurrency, "prompt_words": args.prompt_words, "output_tokens": args.output_tokens,
              "prefix_tokens": args.prefix_tokens, "prefix_requests": args.prefix_requests,
              "prefix_concurrency": args.prefix_concurrency, "reps": args.reps, "block_size": args.block_size,
              "max_num_seqs": args.max_num_seqs, "temperature": 0.6, "top_p": 0.95, "seed": args.seed}
    if args.json:
        report("serve", config, figures, ratios, True)
        return 0
    print(table(figures, args))
    rest = {k: v for k, v in figures.items() if not k.startswith(("rate", "conc"))}
    report("serve", config, {k: ("-" if v is None else v) for k, v in rest.items()},
           {k: ("-" if v is None else v) for k, v in ratios.items()}, False)
    return 0

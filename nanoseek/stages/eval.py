"""`nanoseek eval --model DIR --task NAME`: pass@1, cons@k and pass@k of a checkpoint, R1's way.

    nanoseek eval --model runs/tiny/model --task arithmetic                 # 64 held-out problems x 16
    nanoseek eval --model runs/tiny/r1 --data runs/tiny/corpus/problems/eval.jsonl --template chat
    nanoseek eval --model DIR --task gym:chain_sum --k 4 --json --records samples.jsonl
    nanoseek eval --base-url http://127.0.0.1:8000/v1 --model nanoseek --task arithmetic --template chat
    nanoseek eval --base-url https://api.deepseek.com --model deepseek-reasoner --api-key $KEY \
                  --data aime.jsonl --template chat --n-per-request 1 --max-tokens 32768

Any directory `nanoseek.load_pretrained` reads, with its tokenizer.json. Problems come from
nanoseek/eval/problems.py (a task's held-out split, reasoning-gym, a corpus or benchmark JSONL
file), sampling and metrics from nanoseek/eval/evaluate.py (one engine batch of k samples per
problem at T = 0.6, top-p 0.95). Prints a short table, or one JSON object with --json;
--records writes one JSON line per problem (every completion, its answer and score). Progress
goes to stderr: the engine runs all problems as one batch, so there is no per-problem bar.

With --base-url the samples come from an OpenAI-compatible server instead (ours, vLLM,
DeepSeek's API; nanoseek/eval/remote.py): --model is then the served model name, not a
directory; --concurrency bounds the requests in flight, failed requests (429, 5xx, connection
errors) are retried with exponential backoff, and the key comes from --api-key,
$NANOSEEK_API_KEY or $OPENAI_API_KEY. Same prompts, seeds, extraction and metrics: at T = 0
against `nanoseek serve` it gives in-process `nanoseek eval`'s answers, problem for problem.
"""
from __future__ import annotations

import json
import os
import sys
import time

from nanoseek.flags import add_dataclass_arguments, from_args


def add_arguments(p) -> None:
    from nanoseek.eval.evaluate import EvalConfig
    from nanoseek.eval.remote import RemoteConfig
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json); "
                                                   "with --base-url, the served model name")
    p.add_argument("--task", default=None, help="arithmetic | countdown | linear (held-out split), gym:<dataset>, "
                                                "or a .jsonl file; with --data: keep only this task's problems")
    p.add_argument("--data", default=None, help="problems file: a corpus problems/*.jsonl or a GSM8K / MATH / "
                                                "AIME JSONL file")
    p.add_argument("--problem-seed", type=int, default=0, help="the corpus seed whose held-out split to draw "
                                                               "from (our tasks); the reasoning-gym dataset seed")
    add_dataclass_arguments(p, EvalConfig)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weights dtype (default: the "
                                                                                 "checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--records", default=None, help="write per-problem records (completions, answers, scores) "
                                                   "to this JSONL file")
    p.add_argument("--base-url", default=None, help="evaluate an OpenAI-compatible server at this base URL "
                                                    "(e.g. http://127.0.0.1:8000/v1) instead of a checkpoint")
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="with --base-url: the server's API key (default $NANOSEEK_API_KEY, else $OPENAI_API_KEY)")
    add_dataclass_arguments(p, RemoteConfig, skip=("base_url", "model", "api_key"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(result: dict, name: str) -> str:
    """The result for people: a header, then one metric a line."""
    c = result["config"]
    lines = [f"{name}: {result['n_problems']} problems x {result['k']} samples "
             f"(T {c['temperature']}, top-p {c['top_p']}, {c['template']}, <= {c['max_tokens']} tokens)"]
    for key, value in result.items():
        if key.startswith(("pass@", "cons@")):
            lines.append(f"  {key:<9s} {value:6.1%}")
    lines.append(f"  answered  {result['answered']:6.1%}   truncated {result['truncated']:6.1%}")
    lines.append(f"  length    mean {result['mean_length']:.1f}  median {result['median_length']:.0f} tokens")
    return "\n".join(lines)


def main(args) -> int:
    from nanoseek.eval.evaluate import EvalConfig, evaluate
    from nanoseek.eval.problems import load_problems
    cfg = from_args(EvalConfig, args)
    if args.task is None and args.data is None:
        log("nanoseek eval: give --task NAME or --data FILE")
        return 2
    name = args.task or args.data
    problems = load_problems(args.task, cfg.n_problems, args.problem_seed, args.data)
    if not problems:
        log(f"nanoseek eval: no problems for {name}")
        return 2
    if args.base_url:
        return main_remote(args, cfg, problems, name)
    from nanoseek.engine import LLM                # here: a remote evaluation needs no torch
    log(f"loading {args.model}")
    llm = LLM(args.model, dtype=args.dtype)
    if llm.tokenizer is None:
        log(f"{args.model}: no tokenizer.json")
        return 2
    log(f"sampling {len(problems)} problems x {cfg.k} (one engine batch, <= {cfg.max_tokens} tokens each)…")
    t0 = time.perf_counter()
    result = evaluate(llm, problems, cfg, with_records=args.records is not None)
    seconds = time.perf_counter() - t0
    records = result.pop("records", None)
    result.update(model=args.model, task=args.task, data=args.data, seconds=round(seconds, 2))
    log(f"done in {seconds:.1f} s ({llm.counters['generated_tokens'] / max(seconds, 1e-9):.0f} tokens/s)")
    return finish(args, result, records, name)


def main_remote(args, cfg, problems, name: str) -> int:
    from nanoseek.eval.remote import RemoteConfig, RemoteError, evaluate_remote
    remote = from_args(RemoteConfig, args)
    step = max(1, len(problems) // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            log(f"  {done}/{total} problems")
    log(f"sampling {len(problems)} problems x {cfg.k} from {remote.base_url} ({remote.model}), "
        f"<= {remote.concurrency} requests at a time…")
    t0 = time.perf_counter()
    try:
        result = evaluate_remote(problems, cfg, remote, with_records=args.records is not None, progress=progress)
    except RemoteError as e:
        log(f"nanoseek eval: {e}")
        return 1
    seconds = time.perf_counter() - t0
    records = result.pop("records", None)
    result.update(model=args.model, task=args.task, data=args.data, seconds=round(seconds, 2))
    r = result["remote"]
    log(f"done in {seconds:.1f} s: {r['requests']} requests, {r['retries']} retries, "
        f"{r['completion_tokens'] / max(seconds, 1e-9):.0f} tokens/s ({r['reasoning_tokens']} reasoning tokens)")
    return finish(args, result, records, name)


def finish(args, result: dict, records, name: str) -> int:
    if records is not None:
        with open(args.records, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        log(f"wrote {len(records)} records to {args.records}")
    print(json.dumps(result, ensure_ascii=False) if args.json else table(result, name))
    return 0

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

Several benchmarks in one process (the model loaded and torch imported once: the speedrun's
evaluations), each `--bench NAME=FLAGS` with FLAGS this command's own problem and sampling flags
over the shared ones, each result written to DIR/NAME.json (+ DIR/NAME.records.jsonl):

    nanoseek eval --model runs/tiny/r1 --template chat --k 16 --out-dir runs/tiny/eval \
        --bench "r1.heldout=--data runs/tiny/corpus/problems/eval.jsonl" \
        --bench "r1.chain_sum=--task gym:chain_sum --n-problems 32"

A benchmark whose DIR/NAME.json is already there and complete is skipped (a killed run, rerun,
does only what is left); each file is written whole (a temporary file, then renamed), so one is
either complete or absent.

With --base-url the samples come from an OpenAI-compatible server instead (ours, vLLM,
DeepSeek's API; nanoseek/eval/remote.py): --model is then the served model name, not a
directory; --concurrency bounds the requests in flight, failed requests (429, 5xx, connection
errors) are retried with exponential backoff, and the key comes from --api-key,
$NANOSEEK_API_KEY or $OPENAI_API_KEY. Same prompts, seeds, extraction and metrics: at T = 0
against `nanoseek serve` it gives in-process `nanoseek eval`'s answers, problem for problem.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from nanoseek.flags import add_dataclass_arguments, from_args


# flags a --bench may not change: they say what is evaluated and where results go, for all benchmarks
SHARED_ONLY = ("--model", "--base-url", "--api-key", "--bench", "--out-dir", "--json", "--records", "--dtype")


def add_arguments(p, bench: bool = False) -> None:
    """The command's flags; bench=True: those a `--bench NAME=FLAGS` may give (no defaults filled in
    over the shared flags, --model not required)."""
    from nanoseek.eval.evaluate import EvalConfig
    from nanoseek.eval.remote import RemoteConfig
    p.add_argument("--model", required=not bench, help="checkpoint directory (config.json, safetensors, "
                                                       "tokenizer.json); with --base-url, the served model name")
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
    p.add_argument("--bench", action="append", default=None, metavar="NAME=FLAGS",
                   help="evaluate several benchmarks in one process: NAME=FLAGS, FLAGS this command's problem and "
                        "sampling flags over the shared ones (repeatable; needs --out-dir)")
    p.add_argument("--out-dir", default=None, help="with --bench: write DIR/NAME.json and DIR/NAME.records.jsonl "
                                                   "per benchmark, skipping those already complete")


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


def parse_benches(args) -> list[tuple[str, argparse.Namespace]]:
    """--bench NAME=FLAGS, each as (NAME, the shared flags with FLAGS over them); ValueError if malformed."""
    sub = argparse.ArgumentParser(prog="nanoseek eval --bench", add_help=False, exit_on_error=False,
                                  argument_default=argparse.SUPPRESS)
    add_arguments(sub, bench=True)
    for action in sub._actions:            # only what FLAGS gives: the rest comes from the shared flags
        action.default = argparse.SUPPRESS
    out, names = [], set()
    for spec in args.bench:
        name, sep, flags = spec.partition("=")
        name = name.strip()
        if not sep or not name or "/" in name or name.startswith("."):
            raise ValueError(f"--bench {spec!r}: give NAME=FLAGS, NAME a file name (no '/')")
        if name in names:
            raise ValueError(f"--bench {name!r} given twice")
        names.add(name)
        tokens = shlex.split(flags)
        bad = [t for t in tokens if t.split("=")[0] in SHARED_ONLY]
        if bad:
            raise ValueError(f"--bench {name}: {bad[0]} is shared by all benchmarks; give it once, outside --bench")
        try:
            given, extra = sub.parse_known_args(tokens)
        except argparse.ArgumentError as e:
            raise ValueError(f"--bench {name}: {e}") from None
        if extra:
            raise ValueError(f"--bench {name}: unknown flags {' '.join(extra)}")
        out.append((name, argparse.Namespace(**{**vars(args), **vars(given)})))
    return out


def main_benches(args) -> int:
    """Every --bench in turn, the model loaded once; DIR/NAME.json written whole as each finishes."""
    from nanoseek.eval.evaluate import EvalConfig
    from nanoseek.eval.problems import load_problems
    if not args.out_dir or args.records:
        log("nanoseek eval: --bench needs --out-dir (records go to DIR/NAME.records.jsonl, not --records)")
        return 2
    try:
        benches = parse_benches(args)
    except ValueError as e:
        log(f"nanoseek eval: {e}")
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    llm = None
    for i, (name, a) in enumerate(benches, 1):
        a.json, a.records = True, os.path.join(args.out_dir, name + ".records.jsonl")
        path = os.path.join(args.out_dir, name + ".json")
        if complete(path):
            log(f"[{i}/{len(benches)}] {name}: complete, skipped ({path})")
            continue
        if a.task is None and a.data is None:
            log(f"nanoseek eval: --bench {name}: give --task NAME or --data FILE")
            return 2
        cfg = from_args(EvalConfig, a)
        problems = load_problems(a.task, cfg.n_problems, a.problem_seed, a.data)
        if not problems:
            log(f"nanoseek eval: no problems for {name}")
            return 2
        log(f"[{i}/{len(benches)}] {name}")
        if a.base_url:
            rc, result, records = remote_result(a, cfg, problems)
        else:
            if llm is None:
                llm = load_llm(args)
                if llm is None:
                    return 2
            rc, result, records = local_result(a, cfg, problems, llm)
        if rc:
            return rc
        write_records(a.records, records)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        log(table(result, name))
    return 0


def complete(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False


def load_llm(args):
    from nanoseek.engine import LLM                # here: a remote evaluation needs no torch
    log(f"loading {args.model}")
    llm = LLM(args.model, dtype=args.dtype)
    if llm.tokenizer is None:
        log(f"{args.model}: no tokenizer.json")
        return None
    return llm


def local_result(args, cfg, problems, llm) -> tuple[int, dict, list | None]:
    from nanoseek.eval.evaluate import evaluate
    log(f"sampling {len(problems)} problems x {cfg.k} (one engine batch, <= {cfg.max_tokens} tokens each)…")
    t0, tokens0 = time.perf_counter(), llm.counters["generated_tokens"]
    result = evaluate(llm, problems, cfg, with_records=args.records is not None)
    seconds = time.perf_counter() - t0
    records = result.pop("records", None)
    result.update(model=args.model, task=args.task, data=args.data, seconds=round(seconds, 2))
    log(f"done in {seconds:.1f} s ({(llm.counters['generated_tokens'] - tokens0) / max(seconds, 1e-9):.0f} "
        f"tokens/s)")
    return 0, result, records


def main(args) -> int:
    from nanoseek.eval.evaluate import EvalConfig
    from nanoseek.eval.problems import load_problems
    if args.bench:
        return main_benches(args)
    if args.out_dir:
        log("nanoseek eval: --out-dir goes with --bench (one benchmark: --json, --records)")
        return 2
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
        rc, result, records = remote_result(args, cfg, problems)
    else:
        llm = load_llm(args)
        if llm is None:
            return 2
        rc, result, records = local_result(args, cfg, problems, llm)
    return rc or finish(args, result, records, name)


def remote_result(args, cfg, problems) -> tuple[int, dict | None, list | None]:
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
        return 1, None, None
    seconds = time.perf_counter() - t0
    records = result.pop("records", None)
    result.update(model=args.model, task=args.task, data=args.data, seconds=round(seconds, 2))
    r = result["remote"]
    log(f"done in {seconds:.1f} s: {r['requests']} requests, {r['retries']} retries, "
        f"{r['completion_tokens'] / max(seconds, 1e-9):.0f} tokens/s ({r['reasoning_tokens']} reasoning tokens)")
    return 0, result, records


def write_records(path: str | None, records) -> None:
    if records is not None and path:
        with open(path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        log(f"wrote {len(records)} records to {path}")


def finish(args, result: dict, records, name: str) -> int:
    write_records(args.records, records)
    print(json.dumps(result, ensure_ascii=False) if args.json else table(result, name))
    return 0

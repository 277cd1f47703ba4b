"""`nanoseek generate --model DIR --prompt TEXT …`: sample completions from a checkpoint directory.

Any directory `nanoseek.load_pretrained` reads (DeepSeek-V3 or Qwen2/Llama layout) with its own
tokenizer.json. Sampling defaults come from the directory's generation_config.json (R1's
T = 0.6, top-p 0.95 for nanoseek checkpoints), else greedy. `--chat` wraps each prompt as a user
turn of the chat template. One prompt with n = 1 streams to the terminal; otherwise every
completion is printed when all are done (`--json`: one object per prompt, one a line).
"""
from __future__ import annotations

import argparse

import json
import sys


def add_arguments(p):
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--chat", action="store_true", help="render each prompt as a user turn of the chat template")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: generation_config.json)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens at most")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same tokens)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeat for several)")
    p.add_argument("--speculative", type=int, default=0, help="MTP draft tokens per step (0 = off)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="compile the decode steps first (engine/graphs.py; pays off for long generations)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weights dtype (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def stream(llm, prompt, params, write) -> "object":
    """Run one request, calling write(delta_text) as text arrives; returns its first completion."""
    rid = llm.add_request(prompt, params)
    shown, last = 0, None
    while last is None or not last.finished:
        for out in llm.step():
            if out.request_id == rid:
                last = out
                text = out.outputs[0].text
                if len(text) > shown:
                    write(text[shown:])
                    shown = len(text)
    return last.outputs[0]


def main(args) -> int:
    from nanoseek.engine import LLM, SamplingParams
    from nanoseek.engine.loading import sampling_defaults
    temp, top_p = sampling_defaults(args.model)
    params = SamplingParams(temperature=temp if args.temperature is None else args.temperature,
                            top_p=top_p if args.top_p is None else args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, n=args.n, stop=args.stop)
    llm = LLM(args.model, dtype=args.dtype, speculative_tokens=args.speculative, compile=args.compile,
              log=lambda m: print(m, file=sys.stderr))
    if llm.tokenizer is None:
        print(f"{args.model}: no tokenizer.json", file=sys.stderr)
        return 2
    prompts = args.prompt
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in prompts]
    if len(prompts) == 1 and args.n == 1 and not args.json:
        c = stream(llm, prompts[0], params, lambda s: print(s, end="", flush=True))
        print(f"\n[{c.finish_reason}, {len(c.token_ids)} tokens]")
        return 0
    outs = llm.generate(prompts, params)
    for prompt, comps in zip(args.prompt, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "completions": [
                {"text": c.text, "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)} for c in comps]},
                ensure_ascii=False))
            continue
        for c in comps:
            print(f"=== {prompt!r} · sample {c.index} [{c.finish_reason}, {len(c.token_ids)} tokens]")
            print(c.text)
    return 0

"""`nanoseek speedrun`: the main job on the tiny CPU preset.

Until the full R1 pipeline lands (corpus → tokenizer → pretrain → R1-Zero GRPO → cold start →
reasoning RL → rejection sampling → RL → distill → eval), this is the short demo the Foundation
issue asks for: it writes inline synthetic text (arithmetic lines and R1-style chat documents),
trains the tokenizer on it, trains the `tiny` DeepSeek-V3 model (MLA + MoE + MTP) for a few
hundred steps with next-token + MTP loss, saves a Hugging Face directory under runs/<name>/ and
generates from the reloaded checkpoint through the cache protocol. It prints the loss as it goes;
about a minute on 2 cores with the defaults.
"""
from __future__ import annotations

import json
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanoseek.model.cache import ContiguousCache
from nanoseek.checkpoint import load_pretrained, save_pretrained
from nanoseek.config import tiny
from nanoseek.model import Transformer
from nanoseek.model.mtp import mtp_loss
from nanoseek.tokenizer import Tokenizer, train_tokenizer


def add_arguments(p):
    p.add_argument("--name", default="demo", help="run name: output goes to runs/<name>/")
    p.add_argument("--steps", type=int, default=300, help="training steps of the demo model")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seed", type=int, default=0, help="seed for data, init and sampling")


def synthetic_text(rng: random.Random, n: int) -> list[str]:
    """Arithmetic facts and R1-style chat documents, English and Chinese."""
    docs = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if rng.random() < 0.5:
            docs.append(f"{a} + {b} = {a + b}\n{a} - {b} = {a - b}\n")
        else:
            q = f"What is {a} + {b}?" if rng.random() < 0.7 else f"{a} 加 {b} 等于多少？"
            docs.append(f"<｜begin▁of▁sentence｜><｜User｜>{q}<｜Assistant｜><think>\n{a} + {b} = {a + b}\n"
                        f"</think>\n\nThe answer is {a + b}.<｜end▁of▁sentence｜>")
    return docs


def generate(model: Transformer, ids: list[int], max_new: int, eos: int) -> list[int]:
    """Greedy decoding through a ContiguousCache: one prefill, then one token per step."""
    cache = ContiguousCache(model.num_cache_layers(), model.config.cache_width(), 1, len(ids) + max_new)
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache=cache).logits
        for _ in range(max_new):
            nxt = int(logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            logits = model(torch.tensor([[nxt]]), cache=cache).logits
    return out


def main(args) -> int:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out_dir = os.path.join("runs", args.name)
    os.makedirs(out_dir, exist_ok=True)
    docs = synthetic_text(rng, 4000)
    tok = train_tokenizer(docs, vocab_size=512)
    stream = [t for d in docs for t in tok.encode(d)]
    print(f"[speedrun] tokenizer: vocab {tok.vocab_size}; corpus {len(stream):,} tokens")
    cfg = tiny(vocab_size=tok.vocab_size)
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.tensor(stream)
    tokens_per_step, t0 = args.batch * args.seq_len, time.time()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,))
        x = torch.stack([data[s: s + args.seq_len + 1] for s in starts.tolist()])
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        extra, _ = mtp_loss(out.mtp_logits, x[:, :-1], weight=0.3, labels=x)
        opt.zero_grad(set_to_none=True)
        (loss + extra).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:  # warmup then cosine
            g["lr"] = 2e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + torch.cos(torch.tensor(step / args.steps * 3.1416)).item())
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{(step + 1) * tokens_per_step / (time.time() - t0):.0f}")
    model_dir = os.path.join(out_dir, "model")
    save_pretrained(model.eval(), model_dir, tokenizer=tok)
    reloaded, tok2 = load_pretrained(model_dir), Tokenizer.load(model_dir)
    prompt = tok2.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True)
    text = tok2.decode(generate(reloaded, prompt, 40, tok2.eos_id))
    print(f"[speedrun] saved {model_dir}\n[speedrun] What is 12 + 30? -> {text!r}")
    with open(os.path.join(out_dir, "demo.json"), "w") as f:
        json.dump({"final_loss": loss.item(), "steps": args.steps, "sample": text}, f, indent=2)
    return 0

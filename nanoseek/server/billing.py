"""Usage and cost of one request, DeepSeek's way: cache hits, misses and output priced apart.

DeepSeek's API bills input that hits its context cache at a quarter of a miss (§1.6, §1.9 of
../shared/reference/serving.md). `usage` returns the OpenAI usage object with DeepSeek's
extras, so clients written for either read it:

    prompt_tokens            = prompt_cache_hit_tokens + prompt_cache_miss_tokens (DeepSeek states it)
    prompt_tokens_details.cached_tokens      = prompt_cache_hit_tokens (OpenAI's name for the same)
    completion_tokens        all generated tokens, reasoning included (DeepSeek bills them alike)
    completion_tokens_details.reasoning_tokens   those up to and including `</think>`
    cost, cost_details       the request's price at the configured rates per million tokens

Prices default to DeepSeek's published deepseek-chat rates after the V3 promotion, 0.5 / 2 / 8 yuan
per million input-hit / input-miss / output tokens [DS-price-2025Q1]. Neither DeepSeek nor OpenAI
returns a cost, so its shape is ours (decided, not copied): `cost` is one number, as OpenRouter
returns it, and `cost_details` names the currency and the three parts. A hit here is what the
engine's prefix cache served (whole blocks, the last prompt token always recomputed:
nanoseek/engine/prefix_cache.py), at the engine's block size where DeepSeek's unit is 64 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prices:
    input_hit: float = 0.5        # per million prompt tokens served from the prefix cache
    input_miss: float = 2.0       # per million prompt tokens computed
    output: float = 8.0           # per million generated tokens (reasoning included)
    currency: str = "CNY"


def cost(prices: Prices, hit: int, miss: int, output: int) -> dict:
    """The price of hit / miss / output tokens, per part and in total (rounded to 1e-9).

    >>> cost(Prices(), hit=1_000_000, miss=500_000, output=250_000)["total"]
    3.5
    """
    parts = {"input_cache_hit": hit * prices.input_hit / 1e6, "input_cache_miss": miss * prices.input_miss / 1e6,
             "output": output * prices.output / 1e6}
    parts = {k: round(v, 9) for k, v in parts.items()}
    return {"currency": prices.currency, **parts, "total": round(sum(parts.values()), 9)}


def usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int, reasoning_tokens: int,
          prices: Prices) -> dict:
    """The usage object of a response (OpenAI's fields + DeepSeek's cache fields + cost).

    >>> u = usage(100, 64, 10, 7, Prices())
    >>> u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == u["prompt_tokens"]
    True
    >>> u["completion_tokens_details"], u["cost"]
    ({'reasoning_tokens': 7}, 0.000184)
    """
    miss = prompt_tokens - cached_tokens
    c = cost(prices, cached_tokens, miss, completion_tokens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_cache_hit_tokens": cached_tokens,
        "prompt_cache_miss_tokens": miss,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "cost": c["total"],
        "cost_details": {k: v for k, v in c.items() if k != "total"},
    }

"""The load generator of `nanoseek bench serve`: streamed chat requests timed chunk by chunk, sent at
Poisson arrivals or by a fixed number of workers, and the latency figures of a workload.

    results, seconds = await poisson(client, bodies, rate=4.0, seed=0)      # or closed_loop(..., 16)
    figures = summarize("rate4", results, seconds)   # rate4_ttft_p50_ms, rate4_tpot_p99_ms, ...

TTFT is to the first token of either channel (reasoning_content or content), TTFA to the first answer
token; output tokens are usage.completion_tokens, reasoning included (the client asks for
stream_options.include_usage). Percentiles interpolate linearly, as numpy's default does.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    ok: bool = False
    error: str | None = None
    ttft: float | None = None            # seconds to the first token of either channel
    ttfa: float | None = None            # seconds to the first answer (content) token
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0               # usage.completion_tokens: reasoning included
    reasoning_tokens: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0                  # usage.prompt_cache_hit_tokens


async def stream_chat(client: httpx.AsyncClient, body: dict) -> Result:
    """One streamed chat completion, timed chunk by chunk."""
    res, t0, last = Result(), time.perf_counter(), None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                res.error = f"HTTP {r.status_code}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue                     # blank separators, ": keep-alive" comments
                if line == "data: [DONE]":
                    res.ok = res.error is None
                    break
                now, chunk = time.perf_counter(), json.loads(line[6:])
                if "error" in chunk:
                    res.error = f"in-band: {chunk['error'].get('message', '')[:80]}"
                    continue
                if chunk.get("usage"):
                    u = chunk["usage"]
                    res.output_tokens, res.prompt_tokens = u["completion_tokens"], u["prompt_tokens"]
                    res.hit_tokens = u.get("prompt_cache_hit_tokens") or 0
                    res.reasoning_tokens = (u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    content = delta.get("content") or ""
                    if content or delta.get("reasoning_content") or delta.get("reasoning"):
                        if res.ttft is None:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last = now
                    if content and res.ttfa is None:
                        res.ttfa = now - t0
    except (httpx.HTTPError, ValueError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"[:120]
    res.latency = time.perf_counter() - t0
    if res.ok and res.ttft is None:
        res.ok, res.error = False, "no token streamed"
    return res


async def poisson(client, bodies: list[dict], rate: float, seed: int) -> tuple[list[Result], float]:
    """Requests at Poisson arrivals of `rate` per second (the first at once), no concurrency cap."""
    rng, t0, at, tasks = random.Random(seed), time.perf_counter(), 0.0, []
    for body in bodies:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(stream_chat(client, body)))
        at += rng.expovariate(rate)
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0


async def closed_loop(client, bodies: list[dict], concurrency: int) -> tuple[list[Result], float]:
    """The requests by `concurrency` workers: at most that many in flight, the next sent when one ends."""
    sem, t0 = asyncio.Semaphore(concurrency), time.perf_counter()

    async def one(body):
        async with sem:
            return await stream_chat(client, body)
    results = await asyncio.gather(*(one(b) for b in bodies))
    return list(results), time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no data.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 99), percentile([], 50)
    (2.5, 3.97, None)
    """
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo), 10)


def summarize(name: str, results: list[Result], seconds: float) -> dict:
    """One workload's figures (see the top), milliseconds for times."""
    ok = [r for r in results if r.ok]
    ms = lambda xs: [1e3 * x for x in xs]                      # noqa: E731
    series = {"ttft": ms([r.ttft for r in ok]), "ttfa": ms([r.ttfa for r in ok if r.ttfa is not None]),
              "tpot": ms([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
              "itl": ms([x for r in ok for x in r.itl]), "e2e": ms([r.latency for r in ok])}
    out = {f"{name}_req_s": len(ok) / seconds, f"{name}_output_tok_s": sum(r.output_tokens for r in ok) / seconds}
    for key, xs in series.items():
        out[f"{name}_{key}_p50_ms"], out[f"{name}_{key}_p99_ms"] = percentile(xs, 50), percentile(xs, 99)
    out[f"{name}_answered"] = len(series["ttfa"]) / max(len(ok), 1)
    out[f"{name}_reasoning_share"] = sum(r.reasoning_tokens for r in ok) / max(sum(r.output_tokens for r in ok), 1)
    out[f"{name}_errors"] = len(results) - len(ok)
    return out



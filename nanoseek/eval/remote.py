"""`evaluate_remote(problems, cfg, remote)`: R1's evaluation protocol against an OpenAI-compatible URL.

    remote = RemoteConfig(base_url="http://127.0.0.1:8000/v1", model="nanoseek", concurrency=8)
    result = evaluate_remote(problems, EvalConfig(k=16, template="chat"), remote)   # nanoseek serve
    RemoteConfig(base_url="https://api.deepseek.com", model="deepseek-reasoner", api_key=..., n_per_request=1)

What. The same protocol as evaluate.py, with an HTTP server in place of the engine: the same
prompts (`template` "chat": one user message, the server applies its chat template, ours the R1
one ending in "<think>\\n"; "r1zero": the R1-Zero text to /completions, as in-process), the same
sampling settings and per-problem seed (`problem_seed`, sent as `seed`), then evaluate.py's own
`score` and `summarize`: answers extracted and checked by the very calls the RL reward makes.
Against `nanoseek serve` the remote samples are then the in-process ones, not only at T = 0: the
server seeds each request's generators as the in-process batch does, so at T = 0.6 the texts,
answers and scores agree sample for sample too (tests/server/test_eval_remote.py, chat and
R1-Zero templates). Other servers (vLLM, DeepSeek) sample their own way; the protocol and the
scoring are what stay the same.

The response text. A reasoning server returns the reasoning beside the answer (DeepSeek's
`reasoning_content`, vLLM's newer `reasoning`); the text scored is reasoning + "</think>" +
content, the tag the server split at put back, which is exactly the in-process completion (the
engine's text splits at its first `</think>`, server/reasoning.py) and what `extract_answer`
reads (the answer after the last `</think>`). No reasoning field: the content alone. Content null
(the reply stopped inside the reasoning): the reasoning alone, which has no answer, as in-process.

Lengths. OpenAI's usage gives completion_tokens per request, summed over its `n` choices, with
reasoning tokens included (DeepSeek's `completion_tokens_details.reasoning_tokens` is counted
apart too; the result reports both sums). With n = 1 each sample's length is exact; with n > 1
the request's total is shared among its choices in proportion to their text length (largest
remainders, so the sum stays exact): `mean_length` is exact either way, `median_length` and the
per-sample `lengths` of the records are estimates when choices differ. A server that sends no
usage gives lengths of 0.

Requests. One request per problem with `n = k` (the server forks the prompt's KV once, like the
in-process batch), or `n_per_request` samples each for servers without `n` (DeepSeek's API
documents none); chunk j then uses seed problem_seed + j. At most `concurrency` requests are in
flight (an asyncio semaphore over one httpx client). 429, any 5xx (and 408 / 409, as the openai
client does), a connection error, a timeout or an unreadable 200 body is retried up to
`max_retries` times with exponential backoff and jitter (backoff_s x 2^attempt x U(0.5, 1),
capped at max_backoff_s; a Retry-After header is honoured within the cap), holding its
concurrency slot while it waits, so a throttled run does not push harder. Other 4xx answers (bad
key, unknown model, context too long) are not retried: they raise `RemoteError` with the server's
message, as does a request that runs out of retries. The API key goes in the Authorization header
only; it is never logged or put in the result.

Measured (2026-11-30; 2 cores shared with a pretraining run, nice 19, 1 thread; the model that
`nanoseek bench serve --save-model DIR` trains, served by `nanoseek serve --model DIR`):
`nanoseek eval --task arithmetic --n-problems 32 --k 4 --max-tokens 64 --template chat` took
2.7-2.8 s in-process (one engine batch) and 5.6-7.6 s with `--base-url` at --concurrency 8 (32
requests of n = 4), 4.3-5.4 s at --concurrency 32; T = 0.6, and all 32 problems' texts and
answers were the same both ways, with 5,247 completion tokens of which 3,401 reasoning. The gap is
the server's per-token Python on cores the engine needs (bench/serve.py), not the protocol.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Callable

import httpx

from nanoseek.eval.evaluate import EvalConfig, problem_seed, score, summarize
from nanoseek.tasks import Problem
from nanoseek.tokenizer import END_THINK, r1_zero_prompt

__all__ = ["RemoteConfig", "RemoteCompletion", "RemoteError", "evaluate_remote", "sample_remote", "response_text",
           "share_tokens"]

RETRY_STATUS = frozenset({408, 409, 429})      # and every 5xx


@dataclass
class RemoteConfig:
    base_url: str = field(metadata={"help": "the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1"})
    model: str = field(metadata={"help": "the served model name"})
    api_key: str | None = field(default=None, metadata={"help": "sent as 'Authorization: Bearer KEY'"})
    concurrency: int = field(default=8, metadata={"help": "HTTP requests in flight at most"})
    max_retries: int = field(default=6, metadata={"help": "retries of a request on 429 / 5xx / connection errors"})
    backoff_s: float = field(default=1.0, metadata={"help": "first retry's wait in seconds; doubles each retry"})
    max_backoff_s: float = field(default=60.0, metadata={"help": "longest wait between two tries"})
    timeout_s: float = field(default=600.0, metadata={"help": "seconds one HTTP request may take"})
    n_per_request: int = field(default=0, metadata={
        "help": "samples per request (the `n` parameter): 0 = all k in one request; 1 for servers without `n`"})

    def __post_init__(self):
        if self.concurrency < 1 or self.max_retries < 0 or self.n_per_request < 0:
            raise ValueError("concurrency >= 1, max_retries >= 0 and n_per_request >= 0 are required")


@dataclass
class RemoteCompletion:
    """One sample as evaluate.score reads it (text, token count, finish reason)."""
    index: int
    text: str
    length: int
    finish_reason: str | None

    @property
    def token_ids(self) -> range:
        """The ids stay on the server; score() only counts them."""
        return range(self.length)


class RemoteError(RuntimeError):
    pass


def response_text(reasoning: str | None, content: str | None) -> str:
    """The completion text evaluate.score sees: reasoning + `</think>` + answer (see the top).

    >>> response_text("2 + 3 = 5", "\\n\\n<answer>5</answer>"), response_text(None, "5"), response_text("hm", None)
    ('2 + 3 = 5</think>\\n\\n<answer>5</answer>', '5', 'hm')
    """
    if reasoning is None:
        return content or ""
    return reasoning if content is None else reasoning + END_THINK + content


def share_tokens(total: int, texts: list[str]) -> list[int]:
    """`total` tokens shared among choices in proportion to text length; the sum stays `total`.

    >>> share_tokens(10, ["ab", "ab"]), share_tokens(10, ["a", "abcd"]), share_tokens(3, ["", "", ""])
    ([5, 5], [2, 8], [1, 1, 1])
    """
    weights = [len(t) for t in texts] if any(texts) else [1] * len(texts)
    exact = [total * w / sum(weights) for w in weights]
    out = [int(x) for x in exact]
    for i in sorted(range(len(texts)), key=lambda i: out[i] - exact[i])[:total - sum(out)]:
        out[i] += 1
    return out


# ------------------------------------------------------------------ one request
class _Client:
    def __init__(self, remote: RemoteConfig, cfg: EvalConfig):
        self.remote, self.cfg = remote, cfg
        headers = {"Authorization": f"Bearer {remote.api_key}"} if remote.api_key else {}
        self.http = httpx.AsyncClient(base_url=remote.base_url.rstrip("/") + "/", headers=headers,
                                      timeout=remote.timeout_s,
                                      limits=httpx.Limits(max_connections=remote.concurrency))
        self.slots = asyncio.Semaphore(remote.concurrency)
        self.requests = self.retries = self.completion_tokens = self.reasoning_tokens = 0

    def body(self, problem: Problem, n: int, seed: int) -> tuple[str, dict]:
        c = self.cfg
        body = {"model": self.remote.model, "max_tokens": c.max_tokens, "temperature": c.temperature,
                "top_p": c.top_p, "seed": seed}
        if n > 1:
            body["n"] = n
        if c.template == "chat":
            return "chat/completions", {**body, "messages": [{"role": "user", "content": problem.prompt}]}
        return "completions", {**body, "prompt": r1_zero_prompt(problem.prompt)}

    async def post(self, path: str, body: dict) -> dict:
        """POST with retries (see the top); the parsed JSON of a 200."""
        for attempt in range(self.remote.max_retries + 1):
            wait = None
            try:
                r = await self.http.post(path, json=body)
                if r.status_code == 200:
                    return r.json()
                if r.status_code not in RETRY_STATUS and r.status_code < 500:
                    raise RemoteError(f"{r.status_code} from {self.remote.base_url}/{path}: {_message(r)}")
                problem, wait = f"{r.status_code}: {_message(r)}", _retry_after(r)
            except (httpx.TransportError, ValueError) as e:     # connection, timeout, unreadable body
                problem = f"{type(e).__name__}: {e}"
            if attempt == self.remote.max_retries:
                raise RemoteError(f"{self.remote.base_url}/{path} failed {attempt + 1} times; last: {problem}")
            backoff = self.remote.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0)
            self.retries += 1
            await asyncio.sleep(min(max(backoff, wait or 0.0), self.remote.max_backoff_s))
        raise AssertionError("unreachable")

    async def sample(self, problem: Problem, n: int, seed: int) -> list[RemoteCompletion]:
        path, body = self.body(problem, n, seed)
        async with self.slots:
            data = await self.post(path, body)
        self.requests += 1
        choices = sorted(data.get("choices") or [], key=lambda ch: ch.get("index", 0))
        if len(choices) != n:
            raise RemoteError(f"asked {self.remote.base_url}/{path} for {n} choices, got {len(choices)}")
        texts = [_choice_text(ch) for ch in choices]
        usage = data.get("usage") or {}
        total = int(usage.get("completion_tokens") or 0)
        self.completion_tokens += total
        self.reasoning_tokens += int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
        lengths = share_tokens(total, texts)
        return [RemoteCompletion(0, t, n_tok, ch.get("finish_reason")) for t, n_tok, ch in zip(texts, lengths, choices)]


def _choice_text(choice: dict) -> str:
    if "message" not in choice:                      # /completions
        return choice.get("text") or ""
    m = choice["message"] or {}
    reasoning = m.get("reasoning_content", m.get("reasoning"))
    return response_text(reasoning, m.get("content"))


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return r.text[:300]


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return max(0.0, float(r.headers.get("retry-after", "")))
    except ValueError:
        return None


# ------------------------------------------------------------------ the protocol
async def _sample_all(problems, cfg: EvalConfig, remote: RemoteConfig, progress) -> tuple[list, dict]:
    client, per = _Client(remote, cfg), remote.n_per_request or cfg.k
    done = 0

    async def one(p: Problem) -> list[RemoteCompletion]:
        nonlocal done
        base, chunks = problem_seed(cfg.seed, p), []
        for j, start in enumerate(range(0, cfg.k, per)):
            chunks.append(client.sample(p, min(per, cfg.k - start), (base + j) % (1 << 63)))
        comps = [c for chunk in await asyncio.gather(*chunks) for c in chunk]
        for i, c in enumerate(comps):
            c.index = i
        done += 1
        if progress is not None:
            progress(done, len(problems))
        return comps
    try:
        outs = await asyncio.gather(*(one(p) for p in problems))
    finally:
        await client.http.aclose()
    stats = {"requests": client.requests, "retries": client.retries, "completion_tokens": client.completion_tokens,
             "reasoning_tokens": client.reasoning_tokens}
    return list(outs), stats


def sample_remote(problems: list[Problem], cfg: EvalConfig, remote: RemoteConfig,
                  progress: Callable[[int, int], None] | None = None) -> tuple[list[list[RemoteCompletion]], dict]:
    """k completions per problem from the server, and the request counts (requests, retries, tokens)."""
    return asyncio.run(_sample_all(problems, cfg, remote, progress))


def evaluate_remote(problems: list[Problem], cfg: EvalConfig | None = None, remote: RemoteConfig | None = None,
                    with_records: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """evaluate() against a server: the same records and metrics, plus "remote" (counts, never the key)."""
    if remote is None:
        raise ValueError("evaluate_remote needs a RemoteConfig (base_url, model)")
    cfg = cfg or EvalConfig()
    outs, stats = sample_remote(problems, cfg, remote, progress)
    records = score(problems, outs)
    result = summarize(records, cfg)
    result["remote"] = {"base_url": remote.base_url, "model": remote.model, "concurrency": remote.concurrency,
                        "n_per_request": remote.n_per_request or cfg.k, **stats}
    if with_records:
        result["records"] = records
    return result

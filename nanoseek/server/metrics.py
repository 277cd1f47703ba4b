"""`GET /metrics`: the server's Prometheus text, written by hand (no client library needed).

Names follow vLLM's (serving.md §3.4) with the prefix `nanoseek_`, so dashboards built for vLLM
map one to one: `time_to_first_token_seconds` (arrival at the engine loop to the first token of
either channel: reasoning tokens count, as the newer benchmark tools anchor it, §5.1),
`inter_token_latency_seconds` (gap between two steps that gave a request tokens, divided by the
tokens they gave: MTP speculation can give several), `e2e_request_latency_seconds`, histograms;
`num_requests_running` / `num_requests_waiting` (the scheduler's own lists) and
`num_requests_queued` (what the 429 limit counts: admitted by HTTP, no first token yet); KV
blocks used / total and their ratio; prefix-cache queries and hits in tokens (vLLM's counters:
hit rate = hits / queries); prompt and generation token counters, and `generation_tokens_per_second`
over the last 10 s, a gauge for people reading the page by eye (Prometheus users take rate() of
the counter). Requests finished by reason (stop, length, abort, error, rejected) and errors
returned by HTTP status count separately.

The engine thread records (`on_tokens`, `on_finish`), the event loop records HTTP errors and
renders; one lock keeps a scrape consistent.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
WINDOW_S = 10.0


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += n
        self.sum += value * n
        self.count += n

    def lines(self, name: str, labels: str) -> list[str]:
        out, cum = [], 0
        for le, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {cum}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class Metrics:
    def __init__(self, model_name: str):
        self.labels = f'model_name="{_escape(model_name)}"'
        self.ttft, self.itl, self.e2e = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS), Histogram(E2E_BUCKETS)
        self.prompt_tokens = self.generation_tokens = self.cached_prompt_tokens = 0
        self.finished: Counter = Counter()
        self.http_errors: Counter = Counter()
        self._recent: deque = deque()             # (time, tokens) of the last WINDOW_S seconds
        self._lock = threading.Lock()
        self.started = time.perf_counter()

    # ---- recording (engine thread, except http_error)
    def on_tokens(self, h, new: int, now: float) -> None:
        with self._lock:
            if h.first_token is None:
                self.ttft.observe(now - h.arrival)
                if new > 1:
                    self.itl.observe(0.0, new - 1)
            else:
                self.itl.observe((now - h.last_token) / new, new)
            self.generation_tokens += new
            self._recent.append((now, new))
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()

    def on_finish(self, h, reason: str, out=None) -> None:
        with self._lock:
            self.finished[reason] += 1
            if out is not None:
                self.e2e.observe(time.perf_counter() - h.arrival)
                self.prompt_tokens += h.prompt_tokens
                self.cached_prompt_tokens += out.outputs[0].cached_prompt_tokens

    def http_error(self, status: int) -> None:
        with self._lock:
            self.http_errors[status] += 1

    # ---- the page
    def render(self, engine) -> str:
        s = engine.snapshot
        now = time.perf_counter()
        with self._lock:
            recent = sum(n for t, n in self._recent if t >= now - WINDOW_S)
            rate = recent / max(min(WINDOW_S, now - self.started), 1e-9)
            lab, m = self.labels, []

            def metric(name, kind, help_text, value, extra=""):
                m.extend([f"# HELP nanoseek_{name} {help_text}", f"# TYPE nanoseek_{name} {kind}",
                          f"nanoseek_{name}{{{lab}{extra}}} {value}"])

            metric("num_requests_running", "gauge", "Sequences in the engine's running set.", s.get("running", 0))
            metric("num_requests_waiting", "gauge", "Sequences in the engine's waiting queue.", s.get("waiting", 0))
            metric("num_requests_queued", "gauge", "Requests admitted by HTTP without a first token (the 429 limit).",
                   engine.waiting)
            metric("kv_cache_blocks_used", "gauge", "KV blocks held by sequences.", s.get("blocks_used", 0))
            metric("kv_cache_blocks_total", "gauge", "KV blocks in the engine.", s.get("blocks_total", 0))
            usage = s.get("blocks_used", 0) / max(s.get("blocks_total", 1), 1)
            metric("kv_cache_usage_perc", "gauge", "Share of KV blocks in use (0-1).", f"{usage:.6f}")
            metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                   s.get("prefix_queries", 0))
            metric("prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.",
                   s.get("prefix_hits", 0))
            metric("num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.",
                   s.get("preemptions", 0))
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens)
            metric("generation_tokens_total", "counter", "Generated tokens (reasoning included).", self.generation_tokens)
            metric("generation_tokens_per_second", "gauge", f"Generated tokens per second over the last {WINDOW_S:g} s.",
                   f"{rate:.3f}")
            m += ["# HELP nanoseek_request_finished_total Requests finished, by reason.",
                  "# TYPE nanoseek_request_finished_total counter"]
            m += [f'nanoseek_request_finished_total{{{lab},finished_reason="{r}"}} {c}'
                  for r, c in sorted(self.finished.items())]
            m += ["# HELP nanoseek_http_errors_total Error responses, by HTTP status.",
                  "# TYPE nanoseek_http_errors_total counter"]
            m += [f'nanoseek_http_errors_total{{{lab},status="{st}"}} {c}' for st, c in sorted(self.http_errors.items())]
            for name, h, help_text in (
                    ("time_to_first_token_seconds", self.ttft, "Arrival to the first token of either channel."),
                    ("inter_token_latency_seconds", self.itl, "Time between generated tokens."),
                    ("e2e_request_latency_seconds", self.e2e, "Arrival to the last token.")):
                m += [f"# HELP nanoseek_{name} {help_text}", f"# TYPE nanoseek_{name} histogram"]
                m += h.lines(f"nanoseek_{name}", lab)
        return "\n".join(m) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

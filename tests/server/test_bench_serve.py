"""`nanoseek bench serve --json` on micro sizes: one JSON object with every workload's figures, sane
values (not speeds), 0 errors, cache hits on the shared-prefix workload and none on its twin."""
from __future__ import annotations

import json

from nanoseek.cli import main as cli

MICRO = ["bench", "serve", "--json", "--train-steps", "2", "--requests", "3", "--rates", "20", "--concurrency", "1,3",
         "--prompt-words", "8", "--output-tokens", "5", "--prefix-tokens", "96", "--prefix-requests", "3",
         "--prefix-concurrency", "1", "--reps", "1", "--kv-cache-mb", "16"]


def test_bench_serve_json_micro(capsys):
    assert cli(MICRO) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    r = json.loads(out[0])
    assert r["bench"] == "serve" and set(r) == {"bench", "config", "figures", "ratios"}
    f, ratios = r["figures"], r["ratios"]
    assert r["config"]["rates"] == [20.0] and r["config"]["concurrency"] == [1, 3]
    for w in ("rate20", "conc1", "conc3"):
        assert f[f"{w}_errors"] == 0 and f[f"{w}_req_s"] > 0 and f[f"{w}_output_tok_s"] > 0
        for m in ("ttft", "tpot", "itl", "e2e"):
            assert 0 < f[f"{w}_{m}_p50_ms"] <= f[f"{w}_{m}_p99_ms"], (w, m)
        assert f[f"{w}_ttft_p99_ms"] <= f[f"{w}_e2e_p99_ms"]
        assert 0 <= f[f"{w}_answered"] <= 1 and 0 <= f[f"{w}_reasoning_share"] <= 1
        assert (f[f"{w}_ttfa_p50_ms"] is None) == (f[f"{w}_answered"] == 0)   # 2 training steps: maybe never
    # output tokens are usage.completion_tokens (reasoning included): 3 requests x 5 tokens each
    assert abs(f["conc1_output_tok_s"] / f["conc1_req_s"] - 5) < 1e-6
    assert f["errors"] == 0 and f["prefix_errors"] == 0
    assert f["prefix_requests_hit"] == 2 and 0.5 < f["prefix_hit_rate"] < 1       # the first one misses
    assert f["prefix_miss_workload_hit_rate"] == 0
    assert f["prefix_hit_ttft_p50_ms"] > 0 and f["prefix_miss_ttft_p50_ms"] > 0
    assert f["http_output_tok_s"] > 0 and f["engine_output_tok_s"] > 0 and f["overhead_requests"] == 3
    assert ratios["prefix_hit_vs_miss_ttft"] > 0 and ratios["server_vs_engine_throughput"] > 0

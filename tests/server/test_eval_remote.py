"""`nanoseek eval --base-url` against the live server: the in-process samples and answers, problem for
problem (T = 0, and with seeds at T = 0.6); 429 / 503 / dropped connections retried, other 4xx not."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from nanoseek.cli import build_parser
from nanoseek.engine import LLM
from nanoseek.eval.evaluate import EvalConfig, evaluate
from nanoseek.eval.problems import load_problems
from nanoseek.eval.remote import RemoteConfig, RemoteError, evaluate_remote
from nanoseek.stages import eval as eval_stage
from nanoseek.server.app import ServerConfig
from tests.server.conftest import ENGINE, KEY, LiveServer


@pytest.fixture(scope="module")
def problems():
    return load_problems("arithmetic", 4)


@pytest.fixture(scope="module")
def long_context(model_dir):
    """(server, in-process engine) with room for the R1-Zero prompt (353 tokens with this tokenizer)."""
    engine = {**ENGINE, "num_blocks": 1024, "max_model_len": 1024}
    live = LiveServer(LLM(model_dir, **engine), ServerConfig(served_model_names=("tiny",), api_keys=(KEY,),
                                                             shutdown_grace_s=0.0))
    yield live, LLM(model_dir, **engine)
    live.stop()


def _samples(result) -> list:
    return [(r["prompt"], r["texts"], r["answers"], r["scores"], r["finish"]) for r in result["records"]]


@pytest.mark.parametrize("template,temperature", [("chat", 0.0), ("r1zero", 0.0), ("chat", 0.6)])
def test_remote_eval_gives_the_in_process_samples(request, problems, template, temperature):
    if template == "r1zero":
        server, reference = request.getfixturevalue("long_context")
    else:
        server, reference = request.getfixturevalue("server"), request.getfixturevalue("reference")
    cfg = EvalConfig(k=3, max_tokens=24, temperature=temperature, template=template, seed=5)
    local = evaluate(reference, problems, cfg, with_records=True)
    remote = evaluate_remote(problems, cfg, RemoteConfig(base_url=server.url + "/v1", model="tiny", api_key=KEY,
                                                         concurrency=2), with_records=True)
    assert _samples(remote) == _samples(local)
    # a request's token count is exact; split among n differing samples by text length (remote.py)
    assert [sum(r["lengths"]) for r in remote["records"]] == [sum(r["lengths"]) for r in local["records"]]
    exact = temperature == 0                                           # n equal samples: an exact split
    if exact:
        assert [r["lengths"] for r in remote["records"]] == [r["lengths"] for r in local["records"]]
    same = {k: v for k, v in local.items() if k != "records" and (exact or k != "median_length")}
    assert {k: remote[k] for k in same} == same                       # every metric, mean length included
    assert remote["remote"]["requests"] == len(problems) and remote["remote"]["retries"] == 0
    assert remote["remote"]["completion_tokens"] == sum(sum(r["lengths"]) for r in local["records"])
    if template == "chat":                                             # reasoning counted apart, never more
        assert 0 < remote["remote"]["reasoning_tokens"] <= remote["remote"]["completion_tokens"]
    server.wait_idle()


def test_cli_base_url_matches_in_process_cli_answer_for_answer(server, model_dir, tmp_path, capsys):
    parser = build_parser({"eval": ("nanoseek.stages.eval", "evaluate")})
    common = ["--task", "arithmetic", "--n-problems", "5", "--k", "2", "--max-tokens", "16", "--temperature", "0",
              "--template", "chat", "--json"]
    got = {}
    for side, extra in (("local", ["--model", model_dir]),
                        ("remote", ["--model", "tiny", "--base-url", server.url + "/v1", "--api-key", KEY,
                                    "--concurrency", "3", "--n-per-request", "1"])):
        records = tmp_path / f"{side}.jsonl"
        assert eval_stage.main(parser.parse_args(["eval", *extra, *common, "--records", str(records)])) == 0
        out = json.loads(capsys.readouterr().out)
        got[side] = (out, [json.loads(line) for line in records.read_text().splitlines()])
    (local, local_recs), (remote, remote_recs) = got["local"], got["remote"]
    assert [(r["prompt"], r["answers"], r["texts"]) for r in remote_recs] == \
           [(r["prompt"], r["answers"], r["texts"]) for r in local_recs]
    assert remote["pass@1"] == local["pass@1"] and remote["cons@2"] == local["cons@2"]
    assert remote["remote"]["requests"] == 10 and KEY not in json.dumps(remote)
    server.wait_idle()


def test_wrong_key_or_model_is_an_error_not_retried(server, problems):
    cfg = EvalConfig(k=1, max_tokens=2, template="chat")
    for key, model, status in (("sk-wrong", "tiny", "401"), (KEY, "nope", "404")):
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=status):
            evaluate_remote(problems[:1], cfg, RemoteConfig(base_url=server.url + "/v1", model=model, api_key=key,
                                                            backoff_s=5.0))
        assert time.monotonic() - t0 < 4                                # no backoff wait: not retried


# ------------------------------------------------------------------ a stub that fails first (retry tests only)
class Flaky:
    """An OpenAI-shaped stub: the first calls get the given statuses, then a canned reply."""

    def __init__(self, failures: list[int]):
        self.failures, self.calls = list(failures), []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request):
        body = await request.json()
        self.calls.append(body)
        if self.failures:
            status = self.failures.pop(0)
            return JSONResponse({"error": {"message": f"injected {status}", "type": "x", "param": None,
                                           "code": None}}, status_code=status, headers={"Retry-After": "0"})
        n = body.get("n", 1)
        return JSONResponse({"choices": [{"index": i, "message": {"role": "assistant", "reasoning_content": "2 + 3 = 5",
                                                     "content": "\n\n<answer>5</answer>"}, "finish_reason": "stop"}
                            for i in range(n)],
                             "usage": {"completion_tokens": 7 * n,
                                       "completion_tokens_details": {"reasoning_tokens": 5 * n}}})


@pytest.fixture
def flaky():
    stubs = []

    def start(failures):
        stub = Flaky(failures)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(stub.app, host="127.0.0.1", port=port, log_level="error"))
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            time.sleep(0.01)
        stubs.append(srv)
        return stub, f"http://127.0.0.1:{port}/v1"
    yield start
    for srv in stubs:
        srv.should_exit = True


def test_429_and_503_are_retried_with_backoff_and_then_succeed(flaky):
    from nanoseek.tasks import Problem
    stub, url = flaky([429, 503, 500])
    problems = [Problem("What is 2 + 3?", "5", {"task": "arithmetic"})]
    r = evaluate_remote(problems, EvalConfig(k=4, template="chat"),
                        RemoteConfig(base_url=url, model="m", backoff_s=0.01, max_retries=3), with_records=True)
    assert len(stub.calls) == 4 and r["remote"]["retries"] == 3 and r["remote"]["requests"] == 1
    assert r["pass@1"] == 1.0 and r["records"][0]["texts"][0] == "2 + 3 = 5</think>\n\n<answer>5</answer>"
    assert r["records"][0]["lengths"] == [7, 7, 7, 7] and r["remote"]["reasoning_tokens"] == 20
    assert stub.calls[0]["n"] == 4 and stub.calls[0]["seed"] == stub.calls[-1]["seed"]
    stub, url = flaky([429] * 5)
    with pytest.raises(RemoteError, match="failed 3 times.*429"):
        evaluate_remote(problems, EvalConfig(k=1, template="chat"),
                        RemoteConfig(base_url=url, model="m", backoff_s=0.01, max_retries=2))


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                                       # nothing listens here now
    from nanoseek.tasks import Problem
    with pytest.raises(RemoteError, match="failed 3 times.*ConnectError"):
        evaluate_remote([Problem("What is 1 + 1?", "2")], EvalConfig(k=1, template="chat"),
                        RemoteConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", backoff_s=0.01,
                                     max_retries=2))

"""Under load and when things go wrong: disconnects free KV blocks, a full queue is 429 (streams wait
with keep-alives), shutdown is 503, a failing engine step is an in-band error, and 32 concurrent
streams each get exactly their own seeded output."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from nanoseek.engine import LLM, SamplingParams
from nanoseek.server.app import ServerConfig
from nanoseek.server.reasoning import split
from tests.server.conftest import KEY, LiveServer

AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"model": "tiny", "messages": [{"role": "user", "content": "count"}], "max_tokens": 3000,
        "ignore_eos": True, "stream": True}


def _data_lines(lines, count: int) -> list[str]:
    """The next `count` data lines (pass an iterator: closing a response's line iterator closes it)."""
    got = []
    for line in lines:
        if line.startswith("data: "):
            got.append(line)
            if len(got) == count:
                break
    return got


def test_client_disconnect_aborts_and_frees_kv_blocks(server):
    server.wait_idle()
    aborted = server.metrics.finished["abort"]
    body = {**LONG, "max_tokens": 200}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
        assert len(_data_lines(r.iter_lines(), 3)) == 3
        assert server.llm.blocks.num_free < server.llm.blocks.num_blocks       # it holds blocks now
    server.wait_idle(timeout=5)                   # closed mid-stream: aborted, every block back
    assert server.metrics.finished["abort"] == aborted + 1
    assert not server.llm.scheduler.running and not server.llm.scheduler.waiting


@pytest.fixture(scope="module")
def one_seat(model_dir):
    """One sequence at a time, one request allowed to wait: queueing is easy to provoke."""
    llm = LLM(model_dir, num_blocks=1200, block_size=4, max_num_seqs=1, max_model_len=4096)
    live = LiveServer(llm, ServerConfig(served_model_names=("tiny",), api_keys=(KEY,), max_queue=1,
                                        keepalive_s=0.05, shutdown_grace_s=0.0))
    yield live
    live.stop()


def test_full_queue_is_429_and_queued_streams_get_keepalives(one_seat):
    url = one_seat.url + "/v1/chat/completions"
    with httpx.Client(headers=AUTH, timeout=60) as a_http, httpx.Client(headers=AUTH, timeout=60) as b_http:
        with a_http.stream("POST", url, json=LONG) as a:               # takes the only seat
            a_lines = a.iter_lines()
            assert len(_data_lines(a_lines, 2)) == 2
            short = {**LONG, "max_tokens": 3}
            with b_http.stream("POST", url, json=short) as b:          # waits for the seat
                assert b.status_code == 200
                b_lines = b.iter_lines()
                assert next(b_lines) == ": keep-alive"
                c = httpx.post(url, json=short, headers=AUTH, timeout=30)   # nowhere left to wait
                assert c.status_code == 429 and c.json()["error"]["code"] == "queue_full"
                assert c.headers["retry-after"] == "1"
                a.close()                                               # A leaves: B gets the seat
                lines = [ln for ln in b_lines if ln.startswith("data: ")]
                assert lines[-1] == "data: [DONE]"
                finish = [json.loads(ln[6:])["choices"][0]["finish_reason"] for ln in lines[:-1]]
                assert finish[-1] == "length"
    one_seat.wait_idle()


def test_non_streamed_request_of_a_client_that_left_is_aborted(one_seat):
    body = {**LONG, "stream": False}
    aborted = one_seat.metrics.finished["abort"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(one_seat.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=0.5)
    one_seat.wait_idle(timeout=5)                 # noticed within a second, long before 3000 tokens
    assert one_seat.metrics.finished["abort"] == aborted + 1


def test_shutting_down_is_503(one_seat):
    client = one_seat.client()
    one_seat.engine.begin_shutdown()
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "server_shutting_down"
        assert httpx.get(one_seat.url + "/health").status_code == 503
    finally:
        one_seat.engine.accepting = True
    assert httpx.get(one_seat.url + "/health").status_code == 200


def test_engine_failure_mid_stream_is_an_in_band_error(server, client):
    server.wait_idle()
    real, calls = server.llm.step, []

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real()

    server.llm.step = failing
    try:
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=50, stream=True, extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError, match="engine failed"):
            for _ in stream:
                pass
    finally:
        del server.llm.step
    server.wait_idle()
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices


def test_32_concurrent_streams_each_get_their_own_output(server, reference, tok):
    N, results, errors = 32, {}, []
    prompts = [[{"role": "user", "content": f"client {i}: what is {i} + {i}?"}] for i in range(N)]
    params = [SamplingParams(temperature=1.0, max_tokens=16, seed=100 + i, ignore_eos=True) for i in range(N)]
    want = [c[0].text for c in reference.generate(
        [tok.apply_chat_template(p, add_generation_prompt=True) for p in prompts], params)]
    start = threading.Barrier(N)

    def run(i):
        try:
            client = server.client()
            start.wait()
            reasoning, content, finish = "", "", None
            for ch in client.chat.completions.create(model="tiny", messages=prompts[i], max_tokens=16, seed=100 + i,
                                                     temperature=1.0, stream=True, extra_body={"ignore_eos": True}):
                d = ch.choices[0].delta
                reasoning += d.reasoning_content or ""
                content += d.content or ""
                finish = ch.choices[0].finish_reason or finish
            results[i] = (reasoning, content, finish)
        except Exception as e:                    # noqa: BLE001 - counted below
            errors.append(repr(e))

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == N, errors[:3]
    for i in range(N):
        reasoning, content = split(want[i])
        assert results[i] == (reasoning, content or "", "length"), i
    assert time.monotonic() - t0 < 60
    server.wait_idle()

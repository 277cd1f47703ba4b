"""Every error the issue lists, as an OpenAI error object with the right status, and a fuzz run of
hostile requests that must all get a 4xx while the server stays healthy."""
from __future__ import annotations

import json
import random

import httpx
import openai
import pytest

from tests.server.conftest import KEY

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
AUTH = {"Authorization": f"Bearer {KEY}"}


def _post(server, body, path="/v1/chat/completions", headers=AUTH, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers={"Content-Type": "application/json", **headers},
                      timeout=30, **kw)


def _error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    return err


@pytest.mark.parametrize("change, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "tool", "content": "hi", "tool_call_id": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0"),
    ({"messages": "hi"}, "messages"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -186}, "max_tokens"),
    ({"max_tokens": "12"}, "max_tokens"),
    ({"top_logprobs": 3}, None),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
    ({"stream_options": {"include_usage": True}}, None),
    ({"seed": 1 << 70}, "seed"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, None),
    ({"response_format": {"type": "json_object"}}, None),
])
def test_invalid_chat_bodies_are_400_naming_the_field(server, change, param):
    err = _error(_post(server, {**GOOD, **change}), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_bad_json_and_wrong_shapes_are_400(server):
    for body in [b"{", b"not json", b"[1, 2]", b"null", b"\xff\xfe\x00", b'{"model": "tiny"}', b"[" * 50_000]:
        _error(_post(server, body), 400)
    _error(_post(server, {"model": "tiny", "prompt": []}, "/v1/completions"), 400)
    _error(_post(server, {"model": "tiny", "prompt": [[1, 2], []]}, "/v1/completions"), 400)
    _error(_post(server, {"model": "tiny", "prompt": "x", "logprobs": 6}, "/v1/completions"), 400)
    _error(_post(server, {"model": "tiny", "prompt": "x", "suffix": "y"}, "/v1/completions"), 400)
    err = _error(_post(server, {"model": "tiny", "prompt": [1, 10 ** 9]}, "/v1/completions"), 400)
    assert err["param"] == "prompt"


def test_context_too_long_says_the_token_counts(client, server, tok):
    long = [{"role": "user", "content": "the quick brown fox " * 60}]
    n = len(tok.apply_chat_template(long, add_generation_prompt=True))
    assert n > 256
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=long)
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert "maximum context length is 256 tokens" in err["message"] and f"resulted in {n} tokens" in err["message"]
    short = [{"role": "user", "content": "hello"}]
    m = len(tok.apply_chat_template(short, add_generation_prompt=True))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=short, max_tokens=250)
    assert f"you requested {m + 250} tokens ({m} in the messages, 250 in the completion)" in e.value.body["message"]


def test_auth_failures_are_401(server):
    for key in ["wrong", KEY + "x", KEY[:-1]]:
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(key=key).chat.completions.create(model="tiny", messages=GOOD["messages"], max_tokens=1)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert key not in e.value.body["message"]
    err = _error(_post(server, GOOD, headers={}), 401)
    assert err["code"] == "missing_api_key"
    _error(_post(server, GOOD, headers={"Authorization": f"Basic {KEY}"}), 401)
    _error(_post(server, GOOD, headers={"Authorization": "Bearer"}), 401)
    _error(httpx.get(server.url + "/v1/models"), 401)
    assert server.client(key="sk-second").models.list().data[0].id == "tiny"   # any configured key


def test_unknown_model_and_route_are_404(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=GOOD["messages"])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    _error(httpx.get(server.url + "/v1/nothing-here", headers=AUTH), 404)


def test_oversized_body_is_413(server, client):
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * (100 << 10)}]}
    err = _error(_post(server, big), 413)
    assert "larger than" in err["message"]

    def chunks():                                   # no Content-Length: counted while read
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]
    _error(httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers=AUTH), 413)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=big["messages"])
    assert e.value.status_code == 413


def _hostile(rng: random.Random) -> list[tuple[str, bytes | str | dict]]:
    """≥ 200 malformed requests: bad JSON, wrong types, huge numbers, odd unicode, missing fields."""
    weird = [None, True, -1, 0, 1e308, 10 ** 40, -(10 ** 40), float("nan"), "", "\u0000", "\ud800", "é" * 3,
             [], {}, [[]], {"a": 1}, "1", "inf"]
    chat_fields = {"model": [None, 1, [], "", "\ud800", "tiny\u0000", "x" * 5000],
                   "messages": [None, {}, [None], [1], [[]], [{"role": "user", "content": 5}],
                                [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                                [{"role": "user", "content": "\ud800"}], [{"role": None, "content": "x"}],
                                [{"content": "x"}], [{"role": "user", "content": ["x"]}]],
                   "temperature": [-0.1, 2.01, 1e308, float("nan"), "1", [1]],
                   "top_p": [-1, 1.0001, "0.5", {}], "n": [0, -5, 129, 10 ** 40, 1.5, "2", True],
                   "max_tokens": [0, -1, 10 ** 40, 1.5, "8", [], True], "seed": [10 ** 40, 1.5, "7", []],
                   "stop": [1, [1], [None], ["\ud800"], ["s"] * 17, {}], "stream": ["yes", 1, []],
                   "logprobs": ["true", 2, []], "top_logprobs": [-1, 21, "3", 10 ** 40],
                   "stream_options": [{"include_usage": True}, "x", []]}
    out = []
    for field, bad in chat_fields.items():
        for v in bad:
            if v is None and field not in ("model", "messages"):
                continue
            out.append(("/v1/chat/completions", {**GOOD, field: v}))
    for field in ("model", "messages"):
        out.append(("/v1/chat/completions", {k: v for k, v in GOOD.items() if k != field}))
    comp = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    for v in weird + [[1, "a"], [[1], ["a"]], [-1], [10 ** 12], [[]], [], ["\ud800"]]:
        if isinstance(v, str) and v not in ("", "\ud800") and v != "\u0000":
            continue                                  # plain strings are valid prompts
        if v in ("", "\u0000"):
            continue
        out.append(("/v1/completions", {**comp, "prompt": v}))
    for field, v in [("logprobs", 6), ("logprobs", -1), ("echo", "yes"), ("best_of", 3), ("suffix", "x"),
                     ("n", 0), ("max_tokens", 0), ("temperature", 9), ("stream_options", {"include_usage": True})]:
        out.append(("/v1/completions", {**comp, field: v}))
    raw = [b"", b"{", b"}", b"[", b"nul", b'{"model": }', b"\x00\x01\x02", b"\xff" * 64, b'{"model": "tiny",}',
           b'{"a": ' * 5000, "{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"\\ud800\"}]}",
           b"[]", b"1", b'"str"', b"true", b"NaN", b"1e999999"]
    out += [(path, r) for r in raw for path in ("/v1/chat/completions", "/v1/completions")]
    for _ in range(60):                              # random garbage and random truncations of a valid body
        good = json.dumps({**GOOD, "temperature": 0.5}).encode()
        cut = rng.randrange(1, len(good) - 1)
        out.append(("/v1/chat/completions", good[:cut]))
        out.append(("/v1/completions", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))))
    out.append(("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}))
    out.append(("/v1/chat/completions", {**GOOD, "model": "不存在的模型"}))
    return out


def test_fuzz_hostile_requests_get_4xx_and_the_server_stays_up(server, client):
    cases = _hostile(random.Random(0))
    assert len(cases) >= 200
    statuses = {}
    with httpx.Client(timeout=30, headers={**AUTH, "Content-Type": "application/json"}) as http:
        for path, body in cases:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            r = http.post(server.url + path, content=data)
            assert 400 <= r.status_code < 500, (path, str(body)[:200], r.status_code, r.text[:200])
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert set(statuses) <= {400, 404, 413}
    assert httpx.get(server.url + "/health").status_code == 200
    assert client.chat.completions.create(model="tiny", messages=GOOD["messages"], max_tokens=2).choices
    server.wait_idle()

"""The API with the official openai client against a live server: chat (reasoning split, stream,
usage, prefix-cache hits over turns), n, stop, max_tokens, seeds, logprobs, completions, models,
health, metrics. Replies are checked against the engine itself (the `reference` LLM, same weights)."""
from __future__ import annotations

import json

import httpx
import pytest

from nanoseek.engine import SamplingParams
from nanoseek.server.billing import Prices
from nanoseek.tokenizer import END_THINK
from tests.server.conftest import KEY

QUESTION = [{"role": "user", "content": "What is 12 + 30? Think first."}]
SAMPLED = dict(temperature=1.0, n=32, max_tokens=48, seed=0)     # several choices reach </think> (seed 0)


def _ids(tok, messages):
    return tok.apply_chat_template(messages, add_generation_prompt=True)


def _text(msg) -> str:
    """A reply as the engine generated it: reasoning, then </think> and the answer if it got there."""
    return msg.reasoning_content + (END_THINK + msg.content if msg.content is not None else "")


def test_chat_splits_reasoning_from_content_and_reports_usage(client, reference, tok):
    r = client.chat.completions.create(model="tiny", messages=QUESTION, **SAMPLED)
    ref = reference.generate(_ids(tok, QUESTION), SamplingParams(**SAMPLED))[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert [c.index for c in r.choices] == list(range(32))
    answered = 0
    for c, e in zip(r.choices, ref):
        m = c.message
        assert m.role == "assistant" and _text(m) == e.text
        assert c.finish_reason == e.finish_reason
        if END_THINK in e.text:
            reasoning, answer = e.text.split(END_THINK, 1)
            assert (m.reasoning_content, m.content) == (reasoning, answer)
            answered += bool(reasoning and answer)
        else:
            assert m.content is None and m.reasoning_content == e.text
    assert answered >= 2                         # both channels filled, for real
    u = r.usage
    assert u.prompt_tokens == len(_ids(tok, QUESTION))
    assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens
    assert u.completion_tokens == sum(len(e.token_ids) for e in ref)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    end = tok.end_think_id
    assert u.completion_tokens_details.reasoning_tokens == sum(
        e.token_ids.index(end) + 1 if end in e.token_ids else len(e.token_ids) for e in ref)
    p = Prices()
    want = (u.prompt_cache_hit_tokens * p.input_hit + u.prompt_cache_miss_tokens * p.input_miss
            + u.completion_tokens * p.output) / 1e6
    assert u.cost == pytest.approx(want, abs=1e-8) and u.cost_details["currency"] == "CNY"


def test_stream_sends_role_then_reasoning_then_content(client):
    plain = client.chat.completions.create(model="tiny", messages=QUESTION, **SAMPLED)
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, stream=True,
                                                 stream_options={"include_usage": True}, **SAMPLED))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == plain.usage.completion_tokens
    assert last.usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(c.usage is None for c in body)
    for choice in plain.choices:
        mine = [c.choices[0] for c in body if c.choices[0].index == choice.index]
        first = mine[0].delta
        assert (first.role, first.content, first.reasoning_content) == ("assistant", None, "")
        deltas, ends = mine[1:-1], mine[-1]
        assert ends.finish_reason == choice.finish_reason and all(d.finish_reason is None for d in mine[:-1])
        kinds = ["r" if d.delta.reasoning_content is not None else "c" for d in deltas]
        assert kinds == sorted(kinds, reverse=True)               # reasoning deltas, then content deltas
        for d in deltas:                                          # exactly one channel per chunk
            assert (d.delta.content is None) != (d.delta.reasoning_content is None)
        reasoning = "".join(d.delta.reasoning_content for d in deltas if d.delta.reasoning_content is not None)
        content = [d.delta.content for d in deltas if d.delta.content is not None]
        assert reasoning == choice.message.reasoning_content
        assert ("".join(content) if content else None) == (choice.message.content or None)


def test_raw_stream_ends_with_done(server):
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_second_turn_hits_the_prefix_cache_on_the_first_prompt(client, tok, server):
    first = [{"role": "user", "content": "Please add 17 and 25, then multiply the sum by 3, step by step."}]
    r1 = client.chat.completions.create(model="tiny", messages=first, max_tokens=12, temperature=0)
    m1 = r1.choices[0].message
    second = first + [{"role": "assistant", "content": m1.content or "42",
                       "reasoning_content": m1.reasoning_content},
                      {"role": "user", "content": "And minus 6?"}]
    r2 = client.chat.completions.create(model="tiny", messages=second, max_tokens=4, temperature=0)
    ids1 = _ids(tok, first)
    ids2 = _ids(tok, [{k: v for k, v in m.items() if k != "reasoning_content"} for m in second])
    assert r2.usage.prompt_tokens == len(ids2)                    # the history's reasoning was dropped
    common = next(i for i, (a, b) in enumerate(zip(ids1, ids2)) if a != b)
    B = server.llm.blocks.block_size
    assert common >= 8 and r2.usage.prompt_cache_hit_tokens == common // B * B > 0
    assert r2.usage.prompt_tokens_details.cached_tokens == r2.usage.prompt_cache_hit_tokens
    assert r2.usage.prompt_cache_miss_tokens == len(ids2) - r2.usage.prompt_cache_hit_tokens


def test_n_max_tokens_seed_and_stop(client, server):
    kw = dict(model="tiny", messages=QUESTION, temperature=1.0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(n=3, max_tokens=5, seed=7, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 15
    assert all(c.finish_reason == "length" for c in r.choices)
    again = client.chat.completions.create(n=3, max_tokens=5, seed=7, **kw)
    other = client.chat.completions.create(n=3, max_tokens=5, seed=8, **kw)
    texts = lambda resp: [_text(c.message) for c in resp.choices]          # noqa: E731
    assert texts(again) == texts(r) and texts(other) != texts(r)
    assert len(set(texts(r))) == 3                                         # the n samples differ
    # stop: cut a greedy completion before a string taken from its middle
    full = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    at = next(i for i in range(4, len(full) - 2) if "\ufffd" not in full[i:i + 2] and full.find(full[i:i + 2]) == i)
    cut = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=24, temperature=0,
                                    stop=[full[at:at + 2], "@@@"], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:at]
    stream = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=24, temperature=0,
                                       stop=full[at:at + 2], stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream) == full[:at]     # held back: no cut text leaked


def test_logprobs_chat_and_completions(client):
    kw = dict(model="tiny", messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    for e in lp:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and isinstance(e.bytes, list)
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)     # greedy takes the top token
    streamed = [e for c in client.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in lp]
    c = client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True}).choices[0]
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == 5
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs) and c.logprobs.text_offset[0] == 0


def test_completions_endpoint(client, reference, tok):
    r = client.completions.create(model="tiny", prompt=["the quick", "hello world"], n=2, max_tokens=6, seed=3,
                                  temperature=1.0)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
    ref = reference.generate(["the quick", "hello world"], SamplingParams(n=2, max_tokens=6, seed=3, temperature=1.0))
    assert [c.text for c in r.choices] == [c.text for per in ref for c in per]
    assert r.usage.prompt_tokens == sum(len(reference.encode(p)) for p in ["the quick", "hello world"])
    ids = reference.encode("hello world")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, seed=3, temperature=1.0)
    assert by_ids.usage.prompt_tokens == len(ids)
    echo = client.completions.create(model="tiny", prompt="the quick", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("the quick")
    chunks = list(client.completions.create(model="tiny-alias", prompt="the quick", max_tokens=6, seed=3,
                                            temperature=1.0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref[0][0].text
    assert chunks[-1].usage.completion_tokens == len(ref[0][0].token_ids)


def test_models_health_metrics_page(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    assert client.models.retrieve("tiny").owned_by == "nanoseek"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    values = {ln.split("{")[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
              if ln and not ln.startswith("#") and "_bucket" not in ln}
    for name in ("time_to_first_token_seconds_count", "inter_token_latency_seconds_count", "generation_tokens_total",
                 "prefix_cache_queries_total", "e2e_request_latency_seconds_count"):
        assert values["nanoseek_" + name] > 0, name
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used", "kv_cache_usage_perc",
                 "generation_tokens_per_second", "prefix_cache_hits_total"):
        assert "nanoseek_" + name in values, name
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")

"""Streams: server-sent events from the engine's cumulative outputs, chat and completions.

    render = ChatChunks(tok, head, params, include_usage, usage)   # or CompletionChunks
    return SSEResponse(events(q, render, keepalive_s, on_error), on_close=abort)

`events` waits on the request's queue (engine_loop.py), keeps only the newest output of each
engine request (outputs are cumulative, so a slow client skips intermediate ones and loses
nothing), asks the renderer for the chunks that output adds, and sends `: keep-alive` comments
when nothing came for keepalive_s (queued, or a slow step). A Failure becomes one in-band
`data: {"error": ...}` event and `data: [DONE]`; the end is the optional usage chunk and
`data: [DONE]`.

Chat chunks, per choice: a first delta {role: "assistant", content: null, reasoning_content: ""}
when its first token arrives, then deltas that carry exactly one channel, reasoning before content
(reasoning.py splits at `</think>`), then the finish_reason with {content: "", reasoning_content:
null} (DeepSeek's documented sequence, serving.md §1.7, says only that the last chunk carries the
reason; this form never hands a client that adds up `delta.content` a delta without it). Logprobs
of the tokens that arrived ride on the last chunk emitted for them. Text is held back by (longest
stop string - 1) characters until more tokens decide: a stop string found across two tokens makes
the engine cut text it had already generated (sequence.py), and what was sent cannot be taken back.

`SSEResponse` runs its `on_close` however the response ends (done, error, or the client gone:
Starlette's disconnect listener cancels the body), which is where the server aborts the request.
"""
from __future__ import annotations

import asyncio
import json

from fastapi.responses import StreamingResponse

from nanoseek.server import reasoning
from nanoseek.server.engine_loop import Failure
from nanoseek.server.protocol import FINISH, chat_logprobs, completion_logprobs

DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that runs `on_close` however it ends (done, error, disconnect)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def holdback(params) -> int:
    return max((len(s) for s in params.stop), default=1) - 1


async def events(q: asyncio.Queue, render, keepalive_s: float, on_error):
    """The SSE body of one HTTP request (see the top)."""
    while not render.done:
        try:
            tag, item = await asyncio.wait_for(q.get(), timeout=keepalive_s)
        except asyncio.TimeoutError:
            yield ": keep-alive\n\n"
            continue
        latest = {tag: item}
        while not q.empty():
            t, it = q.get_nowait()
            if not isinstance(latest.get(t), Failure):
                latest[t] = it
        failure = next((it for it in latest.values() if isinstance(it, Failure)), None)
        if failure is not None:
            on_error(failure.error)
            yield sse(failure.error.body())
            yield DONE
            return
        for t, out in sorted(latest.items()):
            for chunk in render.update(t, out):
                yield sse(chunk)
    for chunk in render.finish():
        yield sse(chunk)
    yield DONE


class ChatChunks:
    """chat.completion.chunk objects from cumulative outputs, per choice (see the top)."""

    def __init__(self, tok, head: dict, params, include_usage: bool, usage):
        self.tok, self.params, self.include_usage, self.usage = tok, params, include_usage, usage
        self.head = {**head, "object": "chat.completion.chunk"}
        n = params.n
        self.streams = [reasoning.ReasoningStream() for _ in range(n)]
        self.started, self.ended, self.lp_sent = [False] * n, [False] * n, [0] * n
        self.hold = holdback(params)
        self.last = None

    @property
    def done(self) -> bool:
        return all(self.ended)

    def chunk(self, index: int, delta: dict, finish=None) -> dict:
        c = {**self.head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            c["usage"] = None
        return c

    def update(self, tag: int, out) -> list[dict]:
        self.last, chunks = out, []
        for c in out.outputs:
            i, final = c.index, c.finish_reason is not None
            if self.ended[i] or (not c.token_ids and not final):
                continue
            mine = []
            if not self.started[i]:
                self.started[i] = True
                mine.append(self.chunk(i, {"role": "assistant", "content": None, "reasoning_content": ""}))
            text = c.text if final else c.text[:max(len(c.text) - self.hold, 0)]
            r, a = self.streams[i].feed(text, final)
            if r:
                mine.append(self.chunk(i, {"content": None, "reasoning_content": r}))
            if a:
                mine.append(self.chunk(i, {"content": a, "reasoning_content": None}))
            if final:
                self.ended[i] = True
                mine.append(self.chunk(i, {"content": "", "reasoning_content": None},
                                       FINISH.get(c.finish_reason, c.finish_reason)))
            if self.params.logprobs is not None and len(c.token_ids) > self.lp_sent[i]:
                s = self.lp_sent[i]
                tops = c.top_logprobs[s:] if c.top_logprobs else None
                mine[-1]["choices"][0]["logprobs"] = {
                    "content": chat_logprobs(self.tok, c.token_ids[s:], (c.logprobs or [])[s:], tops), "refusal": None}
                self.lp_sent[i] = len(c.token_ids)
            chunks += mine
        return chunks

    def finish(self) -> list[dict]:
        if not self.include_usage:
            return []
        return [{**self.head, "choices": [], "usage": self.usage([self.last])}]


class CompletionChunks:
    """text_completion chunks for /v1/completions: one engine request per prompt (tag), n choices each."""

    def __init__(self, tok, head: dict, params, echo: list[str], include_usage: bool, usage):
        self.tok, self.params, self.echo, self.include_usage, self.usage = tok, params, echo, include_usage, usage
        self.head = {**head, "object": "text_completion"}
        k = len(echo) * params.n
        self.sent, self.ended, self.lp_sent = [-1] * k, [False] * k, [0] * k
        self.hold = holdback(params)
        self.last: dict = {}

    @property
    def done(self) -> bool:
        return all(self.ended)

    def update(self, tag: int, out) -> list[dict]:
        self.last[tag], chunks = out, []
        for c in out.outputs:
            i, final = tag * self.params.n + c.index, c.finish_reason is not None
            if self.ended[i] or (not c.token_ids and not final):
                continue
            text = c.text if final else c.text[:max(len(c.text) - self.hold, 0)]
            delta = text[max(self.sent[i], 0):]
            if self.sent[i] < 0:                   # the first chunk of this choice: the echo
                delta = self.echo[tag] + delta
            self.sent[i] = len(text)
            lp = None
            if self.params.logprobs is not None and len(c.token_ids) > self.lp_sent[i]:
                s = self.lp_sent[i]
                tops = c.top_logprobs[s:] if c.top_logprobs else None
                lp = completion_logprobs(self.tok, c.token_ids[s:], (c.logprobs or [])[s:], tops)
                self.lp_sent[i] = len(c.token_ids)
            self.ended[i] = final
            if delta or final or lp:
                ch = {**self.head, "choices": [{"index": i, "text": delta, "logprobs": lp,
                                                "finish_reason": FINISH.get(c.finish_reason) if final else None}]}
                if self.include_usage:
                    ch["usage"] = None
                chunks.append(ch)
        return chunks

    def finish(self) -> list[dict]:
        if not self.include_usage:
            return []
        return [{**self.head, "choices": [], "usage": self.usage([self.last[t] for t in sorted(self.last)])}]

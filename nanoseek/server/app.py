"""The HTTP server: a FastAPI app over one engine loop, speaking OpenAI's API with DeepSeek's extras.

    app = create_app(LLM("runs/x/r1"), ServerConfig(served_model_names=("nanoseek",)))
    uvicorn.run(app, host="127.0.0.1", port=8000)     # what `nanoseek serve` does

Routes: POST /v1/chat/completions and /v1/completions (stream or not), GET /v1/models,
/health, /metrics (metrics.py), / (the chat page, static/index.html). /v1/* needs the API key when
the server has any (Authorization: Bearer, compared in constant time: both sides are hashed
with SHA-256 first, so neither length nor content leaks, and every configured key is compared);
keys are never logged.

A request's way: auth -> body read with a byte limit (413; the rest of an oversized body is drained
so the client reads the 413 instead of a reset connection) -> JSON -> pydantic (protocol.py; 400
naming the field) -> model name (404) -> chat template -> length checks (400 with the token
counts, OpenAI's context_length_exceeded wording) -> the engine loop (engine_loop.py; 429 queue
full, 503 shutting down) -> the answer: one JSON object, or server-sent events (streaming.py).
Chat replies split at `</think>` into reasoning_content and content (reasoning.py); usage counts
cache hits and cost (billing.py).

A client that goes away has its requests aborted at once (their KV blocks freed, scheduler.py):
streams notice through Starlette's disconnect listener (the response's `finally`), non-streamed
requests by checking `is_disconnected()` once a second while they wait.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import pathlib
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nanoseek.engine import SamplingParams
from nanoseek.server import billing, reasoning
from nanoseek.server.engine_loop import EngineLoop, Failure
from nanoseek.server.metrics import Metrics
from nanoseek.server.protocol import (FINISH, APIError, ChatCompletionRequest, CompletionRequest, chat_logprobs,
                                      completion_logprobs, from_validation_error)
from nanoseek.server.streaming import ChatChunks, CompletionChunks, SSEResponse, events

log = logging.getLogger("nanoseek.server")
STATIC = pathlib.Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    served_model_names: tuple[str, ...] = ("nanoseek",)
    api_keys: tuple[str, ...] = ()
    price_input_hit: float = field(default=0.5, metadata={"help": "price per million prompt tokens that hit the "
                                                                  "prefix cache (DeepSeek: 0.5 yuan)"})
    price_input_miss: float = field(default=2.0, metadata={"help": "price per million prompt tokens computed "
                                                                   "(DeepSeek: 2 yuan)"})
    price_output: float = field(default=8.0, metadata={"help": "price per million generated tokens, reasoning "
                                                               "included (DeepSeek: 8 yuan)"})
    currency: str = field(default="CNY", metadata={"help": "currency of the prices, reported with each cost"})
    max_queue: int = field(default=256, metadata={"help": "requests waiting for their first token before "
                                                          "new ones get 429"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body accepted (413 above)"})
    keepalive_s: float = field(default=10.0, metadata={"help": "seconds between ': keep-alive' comments while a "
                                                               "stream waits"})
    default_max_tokens: int = field(default=4096, metadata={"help": "max_tokens of a chat request that sets none "
                                                                    "(capped by the context left)"})
    shutdown_grace_s: float = field(default=10.0, metadata={"help": "on shutdown, seconds running requests get "
                                                                    "to finish before they are aborted"})
    default_temperature: float = 1.0          # the model's generation_config.json when the stage knows it
    default_top_p: float = 1.0


def create_app(llm, cfg: ServerConfig) -> FastAPI:
    metrics = Metrics(cfg.served_model_names[0])
    engine = EngineLoop(llm, metrics, cfg.max_queue)
    api = _API(llm, cfg, engine, metrics)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, cfg.shutdown_grace_s)

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.llm, app.state.metrics = engine, llm, metrics
    auth = Depends(api.check_key)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return api.error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return api.error_response(APIError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("unhandled error")
        return api.error_response(APIError(500, "Internal server error.", "server_error"))

    app.post("/v1/chat/completions", dependencies=[auth])(api.chat)
    app.post("/v1/completions", dependencies=[auth])(api.completions)
    app.get("/v1/models", dependencies=[auth])(api.models)
    app.get("/v1/models/{model_id:path}", dependencies=[auth])(api.model)
    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics_page)
    app.get("/")(api.index)
    return app


class _API:
    def __init__(self, llm, cfg: ServerConfig, engine: EngineLoop, metrics: Metrics):
        self.llm, self.cfg, self.engine, self.metrics = llm, cfg, engine, metrics
        self.tok = llm.tokenizer
        self.prices = billing.Prices(cfg.price_input_hit, cfg.price_input_miss, cfg.price_output, cfg.currency)
        self.key_digests = [hashlib.sha256(k.encode()).digest() for k in cfg.api_keys]
        self.created = int(time.time())
        self.end_think_id = getattr(self.tok, "end_think_id", None)

    # ------------------------------------------------------------------ plumbing
    def error_response(self, e: APIError) -> JSONResponse:
        self.metrics.http_error(e.status)
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def check_key(self, request: Request) -> None:
        if not self.key_digests:
            return
        header = request.headers.get("authorization")
        if not header:
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'.",
                           "authentication_error", code="missing_api_key")
        scheme, _, token = header.partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        ok = False
        for d in self.key_digests:               # every key, no early exit
            ok |= hmac.compare_digest(given, d)
        if not ok or scheme.lower() != "bearer":
            raise APIError(401, "Incorrect API key provided.", "authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request):
        limit = self.cfg.max_body_bytes
        too_big = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        declared = request.headers.get("content-length", "")
        body, size = bytearray(), 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit and not (declared.isdigit() and int(declared) > limit):
                    body += chunk
                elif size > 8 * limit:           # stop draining: the connection will be closed
                    raise too_big
        except ClientDisconnect:
            raise APIError(400, "The client went away before the body ended.", code="client_disconnected") from None
        if size > limit:
            raise too_big
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"The body is not valid JSON ({type(e).__name__}).", code="invalid_json") from None

    def parse(self, cls, data):
        try:
            req = cls.model_validate(data)
        except ValidationError as e:
            raise from_validation_error(e) from None
        if req.model not in self.cfg.served_model_names:
            raise self.unknown_model(req.model)
        return req

    @staticmethod
    def unknown_model(name: str) -> APIError:
        shown = name if len(name) <= 100 else name[:100] + "…"
        return APIError(404, f"The model `{shown}` does not exist.", "not_found_error", "model", "model_not_found")

    def budget(self, n_prompt: int, asked: int | None, what: str, default: int) -> int:
        """max_tokens for a prompt of n_prompt tokens, or a 400 with the counts."""
        L = self.llm.max_model_len
        if asked is not None and n_prompt + asked > L:
            raise APIError(400, f"This model's maximum context length is {L} tokens. However, you requested "
                                f"{n_prompt + asked} tokens ({n_prompt} in the {what}, {asked} in the completion). "
                                f"Please reduce the length of the {what} or completion.", param=what,
                           code="context_length_exceeded")
        if n_prompt >= L:
            raise APIError(400, f"This model's maximum context length is {L} tokens. However, your {what} "
                                f"resulted in {n_prompt} tokens. Please reduce the length of the {what}.",
                           param=what, code="context_length_exceeded")
        room = self.llm.scheduler.capacity_tokens() - self.llm.scheduler.lookahead
        if n_prompt > room:
            raise APIError(400, f"The {what} ({n_prompt} tokens) do not fit this server's KV cache ({room} tokens).",
                           param=what, code="context_length_exceeded")
        return asked if asked is not None else min(default, L - n_prompt)

    def sampling(self, req, max_tokens: int, logprobs: int | None) -> SamplingParams:
        temperature = self.cfg.default_temperature if req.temperature is None else req.temperature
        top_p = self.cfg.default_top_p if req.top_p is None else req.top_p
        if top_p == 0:                           # the smallest nucleus: the most likely token
            temperature, top_p = 0.0, 1.0
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=max(req.top_k, 0), max_tokens=max_tokens,
                              stop=req.stop_list(), ignore_eos=req.ignore_eos, n=req.n, seed=req.seed,
                              logprobs=logprobs)

    def validate_ids(self, ids: list[int]) -> None:
        V = self.llm.model.config.vocab_size
        if any(not 0 <= t < V for t in ids):
            raise APIError(400, f"Token ids must be in [0, {V}).", param="prompt")

    async def collect(self, request: Request, q: asyncio.Queue, rids: list[str]) -> list:
        """Wait for every request's final output (non-streamed); abort all if the client leaves."""
        finals, loop = [None] * len(rids), asyncio.get_running_loop()
        check = loop.time() + 1.0
        try:
            while any(f is None for f in finals):
                try:
                    tag, item = await asyncio.wait_for(q.get(), timeout=max(check - loop.time(), 0.0))
                    if isinstance(item, Failure):
                        raise item.error
                    if item.finished:
                        finals[tag] = item
                except asyncio.TimeoutError:
                    pass
                if loop.time() >= check:         # outputs arrive every step: poll on the clock
                    if await request.is_disconnected():
                        return []
                    check = loop.time() + 1.0
            return finals
        finally:
            self.engine.abort(rids)              # no-op for finished requests

    def usage(self, finals, reasoning_on: bool) -> dict:
        prompt = sum(len(o.prompt_token_ids) for o in finals)
        cached = sum(o.outputs[0].cached_prompt_tokens for o in finals)
        completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
        rt = sum(reasoning.reasoning_tokens(c.token_ids, self.end_think_id) for o in finals for c in o.outputs) \
            if reasoning_on else 0
        return billing.usage(prompt, cached, completion, rt, self.prices)

    def stream(self, q: asyncio.Queue, rids: list[str], render) -> SSEResponse:
        body = events(q, render, self.cfg.keepalive_s, lambda e: self.metrics.http_error(e.status))
        return SSEResponse(body, on_close=lambda: self.engine.abort(rids))    # a no-op once finished

    # ------------------------------------------------------------------ routes
    async def chat(self, request: Request):
        req = self.parse(ChatCompletionRequest, await self.read_json(request))
        if not hasattr(self.tok, "apply_chat_template"):
            raise APIError(400, "This model has no chat template; use /v1/completions.", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        ids = await asyncio.to_thread(self.tok.apply_chat_template, messages, True)
        max_tokens = self.budget(len(ids), req.max_new_tokens(), "messages", self.cfg.default_max_tokens)
        params = self.sampling(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        q: asyncio.Queue = asyncio.Queue()
        rids = self.engine.submit([ids], params, q)
        rid, created, model = "chatcmpl-" + rids[0], int(time.time()), req.model
        if req.stream:
            with_usage = bool(req.stream_options and req.stream_options.include_usage)
            head = {"id": rid, "created": created, "model": model}
            return self.stream(q, rids, ChatChunks(self.tok, head, params, with_usage, lambda f: self.usage(f, True)))
        finals = await self.collect(request, q, rids)
        if not finals:
            return Response(status_code=499)
        choices = []
        for c in finals[0].outputs:
            text, content = reasoning.split(c.text)
            lp = None
            if params.logprobs is not None:
                lp = {"content": chat_logprobs(self.tok, c.token_ids, c.logprobs or [], c.top_logprobs), "refusal": None}
            choices.append({"index": c.index, "message": {"role": "assistant", "content": content,
                                                          "reasoning_content": text},
                            "logprobs": lp, "finish_reason": FINISH.get(c.finish_reason, c.finish_reason)})
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": self.usage(finals, True)}

    async def completions(self, request: Request):
        req = self.parse(CompletionRequest, await self.read_json(request))
        prompts = []
        for p in req.prompts():
            ids = await asyncio.to_thread(self.llm.encode, p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "The prompt is empty.", param="prompt")
            self.validate_ids(ids)
            prompts.append(ids)
        max_tokens = min(self.budget(len(ids), req.max_tokens, "prompt", self.cfg.default_max_tokens)
                         for ids in prompts)
        params = self.sampling(req, max_tokens, req.logprobs)
        q: asyncio.Queue = asyncio.Queue()
        rids = self.engine.submit(prompts, params, q)
        rid, created = "cmpl-" + rids[0], int(time.time())
        echo = [self.tok.decode(ids, skip_special_tokens=True) if req.echo else "" for ids in prompts]
        if req.stream:
            with_usage = bool(req.stream_options and req.stream_options.include_usage)
            head = {"id": rid, "created": created, "model": req.model}
            return self.stream(q, rids, CompletionChunks(self.tok, head, params, echo, with_usage,
                                                         lambda f: self.usage(f, False)))
        finals = await self.collect(request, q, rids)
        if not finals:
            return Response(status_code=499)
        choices = []
        for i, o in enumerate(finals):
            for c in o.outputs:
                lp = None
                if params.logprobs is not None:
                    lp = completion_logprobs(self.tok, c.token_ids, c.logprobs or [], c.top_logprobs)
                choices.append({"index": i * req.n + c.index, "text": echo[i] + c.text, "logprobs": lp,
                                "finish_reason": FINISH.get(c.finish_reason, c.finish_reason)})
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": choices,
                "usage": self.usage(finals, False)}

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "nanoseek",
                "max_model_len": self.llm.max_model_len}

    async def models(self):
        return {"object": "list", "data": [self._card(n) for n in self.cfg.served_model_names]}

    async def model(self, model_id: str):
        if model_id not in self.cfg.served_model_names:
            raise self.unknown_model(model_id)
        return self._card(model_id)

    async def health(self):
        if not self.engine.accepting:
            raise APIError(503, "The server is shutting down.", "service_unavailable", code="server_shutting_down")
        if not self.engine.alive:
            raise APIError(503, "The engine is not running.", "service_unavailable", code="engine_stopped")
        return {"status": "ok"}

    async def metrics_page(self):
        return PlainTextResponse(self.metrics.render(self.engine), media_type="text/plain; version=0.0.4")

    async def index(self):
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

"""The wire format: OpenAI / DeepSeek request bodies in, errors and logprobs out.

Requests are pydantic models in strict mode (a JSON "1" is not an integer, `true` is not a
number) that ignore unknown fields, as vLLM does, so clients sending `user`, `store` or
`metadata` still work; fields we cannot honour are refused with a 400 naming the field (`tools`,
`response_format` other than text, `suffix`, `best_of` != n). Ranges are OpenAI's (serving.md §2.1,
§2.5): temperature 0..2, top_p 0..1 (0 is taken as greedy: our sampler wants top_p > 0), n 1..128,
top_logprobs 0..20 (chat; needs logprobs), logprobs 0..5 (completions), max_tokens >= 1; DeepSeek's
16 stop strings (OpenAI allows 4). `frequency_penalty` / `presence_penalty` are accepted in
-2..2 and have no effect: DeepSeek's reasoner does the same with its unsupported sampling
parameters (§1.2). vLLM's extensions `top_k` and `ignore_eos` are honoured (benchmarks need the
latter). `stream_options` without `stream` is a 400, as in vLLM.

Messages: roles system, developer (OpenAI's new name for system), user, assistant; `tool` and
`function` are refused (the engine has no tool calls). Content is a string or a list of text parts
(joined). An assistant message's `reasoning_content` is dropped, DeepSeek's V3.2 rule (its R1-era
API returned 400 instead; dropping serves clients that echo whole messages back), and the R1
template keeps only the answer of earlier turns anyway, so turn 2's prompt starts with turn 1's
prompt and hits the prefix cache there (§1.3).

Errors are `{"error": {"message", "type", "param", "code"}}`, all four keys present (OpenAI's
Error schema, §2.4); `APIError` carries the HTTP status beside them.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_validation_error(e: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (`messages.0.role`)."""
    err = e.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p))
    msg = err["msg"].removeprefix("Value error, ")
    return APIError(400, f"Invalid request: {loc + ': ' if loc else ''}{msg}", param=loc or None,
                    code="invalid_request_error")


def _is_type_tag(p) -> bool:
    """pydantic names the union member it tried inside `loc` ('prompt', 'list[int]', 0): not a field."""
    return isinstance(p, str) and (p in ("str", "int", "float", "bool", "none", "TextPart")
                                   or p.startswith(("list[", "dict[", "function-", "literal[", "tagged-union[")))


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None     # dropped (see the top)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("text is not valid Unicode (a lone surrogate)") from e
    return text


class _Sampling(_Strict):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int = Field(0, ge=-1, le=1_000_000)          # vLLM's extension; -1 and 0 = off
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1, le=10_000_000)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)   # accepted, no effect (see the top)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    ignore_eos: bool = False                             # vLLM's extension
    user: str | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, v):
        return _utf8(v)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        for s in stops:
            _utf8(s)
        return v

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=100_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=10_000_000)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _checks(self):
        for m in self.messages:
            _utf8(m.text())
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("only response_format {\"type\": \"text\"} is supported")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=10_000_000)     # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (or be left out)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported")
        p = self.prompt
        if isinstance(p, list) and (not p or any(isinstance(x, list) and not x for x in p)):
            raise ValueError("prompt is empty")
        if isinstance(p, list) and len(p) > 1024 and not isinstance(p[0], int):
            raise ValueError("at most 1024 prompts per request")
        for s in ([p] if isinstance(p, str) else [x for x in p if isinstance(x, str)]):
            _utf8(s)
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


# ---------------------------------------------------------------------------- logprobs out
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the symbol of each byte in a BPE piece -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()


def token_bytes(tok, token_id: int) -> list[int]:
    """The raw bytes of one token (a piece of a UTF-8 character stays a piece, as OpenAI gives it)."""
    piece = tok.id_to_token(token_id) if hasattr(tok, "id_to_token") else None
    if piece and all(ch in _BYTES for ch in piece):
        return [_BYTES[ch] for ch in piece]
    return list(tok.decode([token_id]).encode("utf-8"))


def token_text(tok, token_id: int) -> str:
    return tok.decode([token_id])


def chat_logprobs(tok, token_ids, lps, tops) -> list[dict]:
    """OpenAI chat `logprobs.content`: one entry per token, with its top alternatives."""
    out = []
    for i, (t, lp) in enumerate(zip(token_ids, lps)):
        top = tops[i] if tops else {}
        out.append({"token": token_text(tok, t), "logprob": lp, "bytes": token_bytes(tok, t),
                    "top_logprobs": [{"token": token_text(tok, k), "logprob": v, "bytes": token_bytes(tok, k)}
                                     for k, v in top.items()]})
    return out


def completion_logprobs(tok, token_ids, lps, tops, offset: int = 0) -> dict:
    """Legacy completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    texts = [token_text(tok, t) for t in token_ids]
    offsets, pos = [], offset
    for s in texts:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": texts, "token_logprobs": list(lps), "text_offset": offsets,
            "top_logprobs": [{token_text(tok, k): v for k, v in top.items()} for top in tops] if tops else None}


FINISH = {"stop": "stop", "length": "length", "abort": "insufficient_system_resource"}

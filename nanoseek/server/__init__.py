"""The API server: DeepSeek/OpenAI-compatible HTTP over the engine, and the chat page.

app.py describes the design; one concept per file:
  app.py          FastAPI routes, auth, body limits, streaming (SSE), errors; ServerConfig
  engine_loop.py  the thread that owns the LLM: continuous batching across requests, abort
  protocol.py     request bodies (pydantic), error objects, logprobs in OpenAI's shapes
  streaming.py    server-sent events: chat and completion chunks from cumulative outputs
  reasoning.py    reasoning_content / content split at </think>, whole and streaming
  billing.py      usage with cache hits and misses, cost at per-million prices
  metrics.py      /metrics in Prometheus text
  static/index.html  the chat page
"""

"""A live server for the tests: a tiny random-weight V3 with nanoseek's tokenizer (R1 chat template),
written to a temporary directory, served by uvicorn on 127.0.0.1 in a background thread."""
from __future__ import annotations

import socket
import threading
import time

import openai
import pytest
import uvicorn

from nanoseek import save_pretrained
from nanoseek.engine import LLM
from nanoseek.server.app import ServerConfig, create_app
from nanoseek.tokenizer import train_tokenizer
from tests.engine.test_engine import _model, _v3

TEXTS = ["the quick brown fox jumps over the lazy dog 12+34=46", "你好，世界。 hello world",
         "<think>\n1+1=2\n</think>\n\n2"] * 20
KEY = "sk-test-0123456789"
ENGINE = dict(num_blocks=512, block_size=4, max_model_len=256, max_num_seqs=64)


class LiveServer:
    def __init__(self, llm, cfg: ServerConfig):
        self.llm, self.app = llm, create_app(llm, cfg)
        self.engine, self.metrics = self.app.state.engine, self.app.state.metrics
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine holds no request and no KV block (every block free or only cached)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.engine.in_flight and self.llm.blocks.num_free == self.llm.blocks.num_blocks:
                return
            time.sleep(0.01)
        raise AssertionError(f"engine not idle: {self.engine.in_flight} in flight, "
                             f"{self.llm.blocks.num_blocks - self.llm.blocks.num_free} blocks held")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tok):
    path = str(tmp_path_factory.mktemp("serve") / "tiny")
    save_pretrained(_model(_v3(vocab_size=tok.vocab_size)), path, tokenizer=tok)
    return path


@pytest.fixture(scope="session")
def reference(model_dir):
    """The same model in-process, to check what the server returns against the engine itself."""
    return LLM(model_dir, **ENGINE)


@pytest.fixture(scope="session")
def server(model_dir):
    cfg = ServerConfig(served_model_names=("tiny", "tiny-alias"), api_keys=(KEY, "sk-second"),
                       max_body_bytes=64 << 10, keepalive_s=0.2, shutdown_grace_s=0.0)
    live = LiveServer(LLM(model_dir, **ENGINE), cfg)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def client(server):
    return server.client()

"""A tiny model folder (random weights, a BPE tokenizer trained here) and a live server on a free
localhost port, run by uvicorn in a thread of the test process and stopped after the test."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

try:  # the HTTP client the openai package is built on (httpx, or its successor httpx2)
    import httpx
except ImportError:
    try:
        import httpx2 as httpx
    except ImportError:  # the test modules skip without the serve extra
        httpx = None

from ratplus.config import ModelConfig
from ratplus.io.folder import save_pretrained
from ratplus.io.tokenizer import train_bpe
from ratplus.model.rat import RATPlusLM

EOS = "<|endoftext|>"
TEXT = [
    "Once upon a time there was a small model that served many requests at once.",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "Sparse attention keeps the keys at every sixteenth position and a local window of recent ones.",
]
NAME = "tiny"
DENSE, D16 = "dense", "D16-W8-P2"  # D16 with a short window, so dilation matters at these lengths


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe(TEXT * 4, vocab_size=320)


@pytest.fixture(scope="session")
def model(tokenizer) -> RATPlusLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.get_vocab_size(),
        d_model=32,
        num_layers=2,
        num_heads=4,
        max_seq_len=1024,
        eos_token_id=tokenizer.token_to_id(EOS),
        name=NAME,
    )
    return RATPlusLM(config).eval()


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory, model, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("serve") / NAME
    save_pretrained(model, path, tokenizer=tokenizer)
    return path


@dataclass
class Live:
    url: str
    engine: object
    state: object

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60, **kw)

    def async_client(self):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)


@contextlib.contextmanager
def live_server(
    model,
    tokenizer,
    patterns=(DENSE, D16),
    kv_memory: int = 1 << 30,
    chat_template: str | None = None,
    name: str = NAME,
    api_key: str | None = None,
    max_body: int | None = None,
    **engine_kw,
) -> Iterator[Live]:
    """uvicorn in a thread on a socket bound to port 0 (no fixed port); stopped and joined on exit."""
    import uvicorn

    from ratplus.serve.app import ServeState, create_app
    from ratplus.serve.engine import Engine

    engine = Engine(model, list(patterns), kv_memory, **engine_kw)
    state = ServeState(engine, tokenizer, name, chat_template)
    guard = {"api_key": api_key} | ({} if max_body is None else {"max_body": max_body})
    app = create_app(state, shutdown_grace=1.0, **guard)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", engine, state)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server thread did not stop"
        assert engine.state == "stopped"


@pytest.fixture(scope="module")
def live(model, tokenizer) -> Iterator[Live]:
    with live_server(model, tokenizer, max_batch=8, max_queue=64) as server:
        yield server

"""How long a running stream stalls while hostile bodies arrive (the figures in docs/guides/serve.md).

A 900-token stream (the decode step slowed to >= 5 ms) runs on the tests' tiny model while three
bodies arrive one after another: a 3.9 MB text prompt (400: cannot fit the context), an 8 MB body
(413: over --max-body) and a 3.9 MB list of token ids (400). Prints each answer's status and time and
the stream's longest gap between chunks.

    OMP_NUM_THREADS=1 python -m scripts.serve_hostile_stall   # from the repository root (it uses tests/serve)
"""

from __future__ import annotations

import itertools
import json
import threading
import time

import httpx
import torch

from ratplus.config import ModelConfig
from ratplus.io.tokenizer import train_bpe
from ratplus.model.rat import RATPlusLM
from tests.serve.conftest import EOS, NAME, TEXT, live_server


def main() -> None:
    tok = train_bpe(TEXT * 4, vocab_size=320)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, num_layers=2, num_heads=4,
                      max_seq_len=1024, eos_token_id=tok.token_to_id(EOS), name=NAME)
    model = RATPlusLM(cfg).eval()
    with live_server(model, tok, patterns=("dense",)) as live:
        inner = live.engine.decode_step

        def slowed(*args):  # a step as slow as a real model's, so gaps are measurable
            time.sleep(0.005)
            return inner(*args)

        live.engine.decode_step = slowed
        arrivals: list[float] = []

        def stream() -> None:
            body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True,
                    "stream": True}
            with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.monotonic())

        reader = threading.Thread(target=stream)
        reader.start()
        while len(arrivals) < 5:
            time.sleep(0.01)
        bodies = {
            "3.9 MB text prompt": {"model": NAME, "prompt": "Once upon a time " * 230_000, "max_tokens": 2},
            "8 MB body": {"model": NAME, "prompt": "a" * 8_000_000},
            "3.9 MB token-id prompt": {"model": NAME, "prompt": [7] * 1_300_000, "max_tokens": 2},
        }
        for what, body in bodies.items():
            raw = json.dumps(body).encode()
            t0 = time.monotonic()
            r = httpx.post(f"{live.url}/v1/completions", content=raw, timeout=120)
            print(f"{what}: {len(raw) / 1e6:.1f} MB -> HTTP {r.status_code} in {time.monotonic() - t0:.2f} s")
        reader.join()
        gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
        print(f"stream: {len(arrivals)} chunks, longest gap {gaps[-1] * 1000:.0f} ms, "
              f"median {gaps[len(gaps) // 2] * 1000:.1f} ms")


if __name__ == "__main__":
    main()

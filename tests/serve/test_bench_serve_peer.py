"""``ratplus bench serve --peer`` on the tiny preset: the same-size transformers Llama served by
``transformers serve --continuous-batching`` (offline, a local folder) gets throughput rows beside
ratplus's, at the same client counts, with every requested token produced and the prompt length
served as asked (about 10 s: most of it is transformers serve's own start-up)."""

from __future__ import annotations

import json

import pytest

for _name in ("fastapi", "uvicorn", "openai", "transformers"):
    pytest.importorskip(_name, reason="needs the serve and hf extras")

from ratplus.bench.serve import PEER_ROW  # noqa: E402
from ratplus.cli import main  # noqa: E402


def test_bench_serve_peer_rows(capsys):
    argv = ["bench", "serve", "--preset", "tiny", "--patterns", "dense", "--clients", "1,3", "--prompt-len", "24"]
    argv += ["--new-tokens", "8", "--phases", "throughput", "--peer"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rec = json.loads(out.strip().splitlines()[-1])
    assert [(r["pattern"], r["clients"]) for r in rec["throughput"]] == [
        ("dense", 1), ("dense", 3), (PEER_ROW, 1), (PEER_ROW, 3)
    ]  # fmt: skip
    for r in rec["throughput"]:
        assert r["e2e_tok_s"] > 0 and r["peak_rss_bytes"] > 0
    for r in rec["throughput"][2:]:
        assert r["output_tokens"] == 8 * r["clients"]  # EOS off: each request runs its max_tokens
        assert r["prompt_tokens_served"] == [24] * r["clients"]
    assert rec["peer"]["startup_s"] > 0 and "dense / peer at 3 clients" in out


def test_bench_serve_no_peer_by_default(capsys):
    argv = ["bench", "serve", "--preset", "tiny", "--clients", "1", "--prompt-len", "16", "--new-tokens", "4"]
    assert main([*argv, "--phases", "throughput", "--patterns", "dense"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["peer"] is None and {r["pattern"] for r in rec["throughput"]} == {"dense"}

"""``ratplus bench serve`` end to end on the tiny preset: the server process, the clients, the
admission count against the formula, a short soak (no request lost, hung or answered with 5xx;
the server idle with no KV bytes afterwards), one JSON line last."""

from __future__ import annotations

import json

import pytest

for _name in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(_name, reason="needs the serve extra: pip install 'ratplus[serve]'")

from ratplus.cli import main  # noqa: E402


def _record(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_serve_small(capsys):
    argv = ["bench", "serve", "--preset", "tiny", "--clients", "1,3", "--prompt-len", "40", "--new-tokens", "12"]
    argv += ["--kv-memory", "200KiB", "--admission-len", "150", "--phases", "throughput,admission,soak"]
    argv += ["--soak-seconds", "4", "--soak-clients", "8", "--soak-prompt", "40"]
    assert main(argv) == 0
    rec = _record(capsys)
    assert [(r["pattern"], r["clients"]) for r in rec["throughput"]] == [
        ("dense", 1), ("dense", 3), ("D16-W256-P4", 1), ("D16-W256-P4", 3)
    ]  # fmt: skip
    for r in rec["throughput"]:
        assert 0 < r["output_tokens"] <= 12 * r["clients"] and r["e2e_tok_s"] > 0 and r["peak_rss_bytes"] > 0
    for a in rec["admission"]:
        assert a["admitted"] == a["formula_count"] == 200 * 1024 // a["kv_bytes_per_request"]
        assert a["kv_bytes_in_use"] == a["admitted"] * a["kv_bytes_per_request"]
    s = rec["soak"]
    assert s["completed"] > 0 and s["hung"] == s["server_errors"] == s["other_errors"] == 0
    assert s["running_after"] == s["queued_after"] == s["kv_bytes_in_use_after"] == s["kv_bytes_allocated_after"] == 0
    # the memory bound: every /metrics scrape during the soak, and the engine's own peak (reshapes included)
    assert s["scrapes"] > 10 and s["scrapes_over_budget"] == 0
    assert 0 < s["kv_bytes_allocated_max"] <= s["kv_bytes_allocated_peak"] <= 200 * 1024
    assert s["server_alive"]


@pytest.mark.parametrize(
    "extra, needle",
    [(["--phases", "warmup"], "--phases"), (["--clients", "0"], "--clients"), (["--device", "meta"], "")],
)
def test_bench_serve_bad_flags(capsys, extra, needle):
    try:
        code = main(["bench", "serve", "--preset", "tiny", *extra])
    except SystemExit as e:  # a number flag's value, refused by argparse itself
        code = e.code
    assert code == 2
    assert "ratplus bench serve: error:" in capsys.readouterr().err


def test_bench_serve_prefix_phase(capsys):
    """The prefix phase: one server without and one with the prefix cache, alternating; every request
    after the first restores the shared prefix on the second server and none on the first."""
    argv = ["bench", "serve", "--preset", "tiny", "--phases", "prefix", "--patterns", "D16-W8-P2"]
    argv += ["--prefix-len", "64", "--suffix-len", "8", "--prefix-requests", "2", "--prefill-chunk", "32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rec = json.loads(out.strip().splitlines()[-1])
    by_mode = {r["prefix_cache"]: r for r in rec["prefix"]}
    assert by_mode["off"]["prefix_hits"] == 0 and by_mode["on"]["prefix_hits"] == 2
    for r in rec["prefix"]:
        assert len(r["ttft_s"]) == 2 and r["ttft_first_s"] > 0 and r["ttft_p50_s"] > 0
    assert "D16-W8-P2: TTFT with the prefix cache" in out
    assert rec["throughput"] == rec["admission"] == [] and rec["soak"] is None

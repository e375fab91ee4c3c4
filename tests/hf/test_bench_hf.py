import json

import pytest

pytest.importorskip("transformers")

from ratplus.cli import main


def test_bench_hf_checks_tokens_then_reports_ratio(capsys, tmp_path):
    out = tmp_path / "hf.json"
    args = ["bench", "hf", "--preset", "tiny", "--pattern", "D4-W8-P2", "--batch", "2"]
    rc = main([*args, "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert record == json.loads(out.read_text())
    assert record["bench"] == "hf_generate" and record["tokens_identical"] is True
    assert record["pattern"] == "D4-W8-P2" and record["new_tokens"] == 4 and record["batch"] == 2
    peers = {"llama generate (dynamic)", "llama generate (static)"}
    assert set(record["seconds"]) == {"ratplus.generate", "hf generate"} | peers
    assert all(record["params"][p] > 0 for p in peers)
    assert record["ratio_hf_over_native"] == pytest.approx(
        record["seconds"]["hf generate"] / record["seconds"]["ratplus.generate"]
    )


def test_bench_hf_rejects_too_long_runs(capsys):
    assert main(["bench", "hf", "--preset", "tiny", "--prompt-len", "250", "--new-tokens", "10"]) == 2
    assert "max_seq_len" in capsys.readouterr().err


def test_bench_hf_without_peer(capsys):
    args = ["bench", "hf", "--preset", "tiny", "--pattern", "D4", "--prompt-len", "8", "--new-tokens", "2"]
    assert main([*args, "--repeats", "1", "--no-peer"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(record["seconds"]) == {"ratplus.generate", "hf generate"}

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
    assert set(record["seconds"]) == {"ratplus.generate", "hf generate"}
    assert record["ratio_hf_over_native"] == pytest.approx(
        record["seconds"]["hf generate"] / record["seconds"]["ratplus.generate"]
    )


def test_bench_hf_rejects_too_long_runs(capsys):
    assert main(["bench", "hf", "--preset", "tiny", "--prompt-len", "250", "--new-tokens", "10"]) == 2
    assert "max_seq_len" in capsys.readouterr().err

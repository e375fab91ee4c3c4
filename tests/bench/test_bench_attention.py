import json

import pytest

from ratplus.cli import main


def test_bench_attention_cli_prints_table_and_json(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "attention",
            "--seq-lens",
            "128,192",
            "--patterns",
            "D4,local-W16-P2",
            "--repeats",
            "1",
            "--layer-len",
            "128",
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--tokens-per-call",
            "384",
            "--with-scan",
            "--json",
            str(out_file),
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])  # the last line is the JSON record
    assert record == json.loads(out_file.read_text())
    assert record["bench"] == "attention" and record["dtype"] == "float32"
    assert [e["T"] for e in record["operator"]] == [128, 192]
    assert [e["batch"] for e in record["operator"]] == [3, 2]
    assert set(record["operator"][0]["patterns"]) == {"RAT+ dense", "D4", "local-W16-P2"}
    assert record["backends"]["D4"] == "sparse"
    for entry in record["operator"]:
        for p in entry["patterns"].values():
            assert p["s"] > 0 and p["speedup"] > 0
    assert "recurrence_overhead_block" in record["layer"]
    assert any("FLOP ratio" in line for line in lines)


def test_bench_rejects_bad_pattern(capsys):
    assert main(["bench", "attention", "--seq-lens", "64", "--patterns", "D0", "--no-layer"]) == 2
    assert "dilation_size" in capsys.readouterr().err


def test_bench_rejects_bad_lengths():
    with pytest.raises(SystemExit):
        main(["bench", "attention", "--seq-lens", "1k"])

import json
import statistics

import pytest

from ratplus.cli import main


def test_bench_train_cli_prints_table_and_json(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    argv = [
        "bench",
        "train",
        "--presets",
        "tiny",
        "--seq-lens",
        "64,128",
        "--repeats",
        "2",
        "--profile",
    ]  # 1 thread by default
    assert main([*argv, "--json", str(out_file)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert record == json.loads(out_file.read_text())
    assert record["bench"] == "train" and record["dtype"] == "float32" and record["device"] == "cpu x1 threads"
    assert [(r["preset"], r["T"]) for r in record["results"]] == [("tiny", 64), ("tiny", 128)]
    for r in record["results"]:
        assert set(r["step_s"]) == {"RAT+ dense", "RAT+ joint", "attention dense", "attention joint"}
        assert all(v > 0 for v in r["step_s"].values())
        assert r["tokens_per_s"]["RAT+ dense"] == r["T"] / r["step_s"]["RAT+ dense"]
        rounds = r["step_s_rounds"]
        assert all(len(ts) == 2 and statistics.median(ts) == r["step_s"][k] for k, ts in rounds.items())
        paired = statistics.median(a / b for a, b in zip(rounds["RAT+ dense"], rounds["attention dense"]))
        assert r["dense_overhead"] == pytest.approx(paired - 1)  # ratio taken within each round
        assert r["breakdown"]["scan_s"] > 0 and r["breakdown"]["gate_proj_s"] > 0
        prof = r["profile"]
        assert prof["self_cpu_ms"]["RAT+"] > 0 and prof["scan_node_ms"] > 0 and len(prof["top_extra_ms"]) == 8
        assert prof["overhead"] == pytest.approx(prof["self_cpu_ms"]["RAT+"] / prof["self_cpu_ms"]["attention"] - 1)
    assert record["sparse_patterns"] == {"RAT+": "D64-W0-P0", "attention": "local-W64-P0"}
    assert any("target <= +15%" in line for line in lines)


def test_bench_train_rejects_bad_input(capsys):
    assert main(["bench", "train", "--presets", "nope", "--seq-lens", "64", "--repeats", "1"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # refused by argparse (ratplus.cli.common.number)
        main(["bench", "train", "--presets", "tiny", "--seq-lens", "64", "--threads", "-1"])
    assert e.value.code == 2 and "argument --threads" in capsys.readouterr().err

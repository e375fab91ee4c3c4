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
    assert set(record["faster_from_T"]) == {"RAT+ dense", "D4", "local-W16-P2"}
    assert any(line.startswith("where the sparse path beats dense") for line in lines)


def test_bench_attention_says_where_the_sparse_gain_starts():
    """The note under the table names, per pattern, the length from which it beat dense at every longer
    length, says why it is slower before that, and says so only where it is."""
    from ratplus.bench.attention import gain_notes, gain_starts

    def entry(T, **speedups):
        return {"T": T, "patterns": {n: {"speedup": s} for n, s in speedups.items()}}

    results = [entry(4096, D16=0.5, D64=1.2), entry(1024, D16=0.2, D64=0.9), entry(16384, D16=3.0, D64=9.0)]
    results.append(entry(8192, D16=0.9, D64=4.0))  # D16 beats dense at 16K only; unsorted input
    assert gain_starts(results) == {"D16": 16384, "D64": 4096}
    assert gain_starts([entry(1024, D16=2.0), entry(2048, D16=0.8)]) == {"D16": None}
    notes = "\n".join(gain_notes(gain_starts(results), [1024, 4096, 8192, 16384]))
    assert "D16: from T=16384" in notes and "D64: from T=4096" in notes and "gain appears at long T" in notes
    fast = "\n".join(gain_notes({"D64": 1024}, [1024, 2048]))
    assert "D64: from T=1024 (every measured length)" in fast and "slower" not in fast
    assert "D16: not up to T=2048" in "\n".join(gain_notes({"D16": None}, [1024, 2048]))


def test_bench_rejects_bad_pattern(capsys):
    assert main(["bench", "attention", "--seq-lens", "64", "--patterns", "D0", "--no-layer"]) == 2
    assert "dilation_size" in capsys.readouterr().err


def test_bench_rejects_bad_lengths():
    with pytest.raises(SystemExit):
        main(["bench", "attention", "--seq-lens", "1k"])

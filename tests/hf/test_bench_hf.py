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


@pytest.mark.slow  # about 25 s: tracing prefill and decode steps, even with Dynamo's eager backend
def test_bench_hf_compiled_rows_side_by_side(capsys):
    """Eager vs compiled forward and generate in one table and the JSON record (Dynamo's eager
    backend here: the same trace and parity checks without inductor's minutes of C++ compilation)."""
    import torch

    from ratplus.bench.hf import run

    record = run(
        "tiny", None, "D4-W8-P2", 1, 12, 2, 1, torch.device("cpu"), torch.float32, peer=False,
        compile=True, compile_backend="eager",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "torch.compile (eager) vs eager" in out and "speedup" in out
    s = record["compiled_seconds"]
    assert set(s) == {
        "forward eager",
        "forward compiled",
        "generate eager",
        "generate compiled",
        "generate compile_decode",
    }
    for what, eager, compiled in (
        ("forward", "forward eager", "forward compiled"),
        ("generate", "generate eager", "generate compiled"),
        ("compile_decode", "generate eager", "generate compile_decode"),
    ):
        assert record["speedup_compiled"][what] == pytest.approx(s[eager] / s[compiled])
        assert record["compile_seconds"][what] > 0


@pytest.mark.slow
def test_bench_hf_compile_flag(capsys):
    args = ["bench", "hf", "--preset", "tiny", "--pattern", "dense", "--prompt-len", "8", "--new-tokens", "2"]
    assert main([*args, "--repeats", "1", "--no-peer", "--compile"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["compile_backend"] == "inductor" and set(record["speedup_compiled"]) == {
        "forward",
        "generate",
        "compile_decode",
    }

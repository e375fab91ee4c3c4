"""Quality vs KV budget: the protocol against an independent computation, bytes per method, the
matched sweep, a tiny end-to-end CLI sweep (two checkpoints, one GQA) and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import folder_digest, make_model

from ratplus import cli
from ratplus.config import ModelConfig
from ratplus.eval.budget import budget_nll, compare_at_bytes, default_sweep, evaluate_budget, method_of
from ratplus.eval.common import EvalModel
from ratplus.eval.ppl import token_stream
from ratplus.io.folder import save_pretrained
from ratplus.model.rat import RATPlusLM

DOCS = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 6,
    "Now is the winter of our discontent made glorious summer by this sun of York. " * 6,
]


def test_pattern_methods_score_the_continuation_of_a_full_forward(tokenizer):
    model = make_model(tokenizer)
    stream = token_stream(DOCS, tokenizer, model.config.eos_token_id)
    T, score = 40, 6
    for pattern in ("dense", "D4-W2-P1", "local-W5-P2"):
        got = budget_nll(model, stream, pattern, T, score, batch_size=3)
        nll, count = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(stream) - 1, T):
                if s + T + 1 > len(stream):
                    break
                chunk = stream.ids[s : s + T + 1].unsqueeze(0)
                logp = F.log_softmax(model(chunk[:, :-1], pattern=pattern).double(), -1)[0]
                for i in range(T - score, T):
                    if stream.scored[s + i + 1]:
                        nll -= float(logp[i, chunk[0, i + 1]])
                        count += 1
        assert got["tokens"] == count > 0
        assert math.isclose(got["nll_sum"], nll, rel_tol=1e-5)


def test_bytes_per_method(tokenizer):
    model = make_model(tokenizer)  # C=32, 4 heads of 8, 2 layers, RAT+ (float32)
    stream = token_stream(DOCS, tokenizer, model.config.eos_token_id)
    slot = 2 * 4 * 8 * 4  # k and v of 4 heads, float32
    state = slot  # [k~, v~] of 4 heads
    T, score = 40, 6
    expect = {"dense": 40, "D4": 1 + 39 // 4, "local-W5-P2": 8, "snapkv-C10-O4": 10 + 4 + score}
    for pattern, slots in expect.items():
        r = budget_nll(model, stream, pattern, T, score, batch_size=2, max_windows=2)
        assert r["kv_bytes"] == 2 * (slots * slot + state), pattern


def test_default_sweep_meets_at_matched_bytes():
    config = ModelConfig.from_preset("demo")
    sweep = default_sweep(config, 256, 8)
    assert "D16" in sweep and "local-W12-P4" in sweep and "snapkv-C5-O4" in sweep
    for p in sweep:
        config.canonical_pattern(p)  # every entry runs
    d16 = config.resolve_pattern("D16")[0].groups[0][0].kv_slots(255) + 1  # + the state's slot
    assert d16 == config.resolve_pattern("local-W12-P4")[0].groups[0][0].kv_slots(255) == 17
    assert {method_of(config, p) for p in sweep} == {"dense", "dilated", "streaming", "snapkv", "topk"}
    assert method_of(config, "D4/dense/D4/dense") == "hybrid"
    assert method_of(config, "D64/D8/D8/D64") == "hybrid" and method_of(config, "D8:2+D8:2") == "dilated"


def test_compare_at_bytes_uses_equal_or_larger_budgets():
    rows = [
        {"model": "a", "method": "dilated", "pattern": "D16", "ppl": 10.0, "kv_bytes": 100},
        {"model": "b", "method": "streaming", "pattern": "x", "ppl": 11.0, "kv_bytes": 100},
        {"model": "b", "method": "streaming", "pattern": "y", "ppl": 9.0, "kv_bytes": 99},  # fewer bytes: ignored
        {"model": "b", "method": "streaming", "pattern": "z", "ppl": 12.0, "kv_bytes": 200},
    ]
    got = compare_at_bytes(rows, "a", "D16", [("b", "streaming"), ("b", "snapkv")])
    assert got == {"b streaming": {"pattern": "x", "ppl": 11.0, "kv_bytes": 100, "gain": pytest.approx(0.1)}}


def test_cli_budget_two_checkpoints_one_gqa(ckpt, tokenizer, tmp_path, capsys):
    torch.manual_seed(1)
    config = ModelConfig(**{**make_model(tokenizer).config.to_dict(), "num_kv_heads": 1, "apply_re": False})
    gqa = tmp_path / "gqa-baseline"
    save_pretrained(RATPlusLM(config).eval(), gqa, tokenizer=tokenizer)
    data = tmp_path / "held.txt"
    data.write_text("\n\n".join(DOCS))
    before = folder_digest(ckpt)
    out = tmp_path / "out"
    args = ["eval", "budget", "--ckpt", str(ckpt), "--ckpt", str(gqa), "--data", str(data), "--seq-len", "48"]
    args += ["--score-tokens", "4", "--out", str(out), "--quiet", "--patterns", "dense,D8,snapkv-C8-O4"]
    assert cli.main(args) == 0
    assert folder_digest(ckpt) == before
    assert (out / "budget.png").stat().st_size > 0
    saved = json.loads((out / "budget.json").read_text())["results"]
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["model"], r["pattern"]) for r in record["results"]] == [
        (m, p) for m in ("tiny-rat", "gqa-baseline") for p in ("dense", "D8-W0-P0", "snapkv-C8-O4")
    ]
    dense = {r["model"]: r["kv_bytes"] for r in saved if r["pattern"] == "dense"}
    assert dense["tiny-rat"] == 2 * (48 * 256 + 256) and dense["gqa-baseline"] == 2 * 48 * 64  # 4x fewer KV heads
    assert all(r["method"] == method_of(config, r["pattern"]) for r in saved)


def test_budget_bad_input(tokenizer):
    em = EvalModel(make_model(tokenizer), tokenizer)
    stream = token_stream(DOCS, tokenizer, em.eos_id)
    with pytest.raises(ValueError, match="score_tokens must be in"):
        budget_nll(em.model, stream, "dense", 32, 32)
    with pytest.raises(ValueError, match="shorter than one window"):
        budget_nll(em.model, stream, "dense", 500, 8)
    with pytest.raises(ValueError, match="seq_len=1024 exceeds"):
        evaluate_budget([em], DOCS, ["dense"], seq_len=1024)
    with pytest.raises(ValueError, match="below its observation window"):
        evaluate_budget([em], DOCS, ["snapkv-C2-O4"], seq_len=32)


def test_unadapted_patterns_make_one_warning_per_model(tokenizer, caplog):
    """The comparison scores pretrained models zero-shot by design: one summary line per model names the
    unadapted patterns (not one warning each), and every row still carries its own status."""
    em = EvalModel(make_model(tokenizer), tokenizer, metadata={"adapted_pattern": "D4-W0-P0"})
    with caplog.at_level("WARNING", logger="ratplus"):
        rows = evaluate_budget([em], DOCS, ["dense", "D4", "D8", "local-W4-P2"], seq_len=32, score_tokens=4)
    lines = [r.getMessage() for r in caplog.records if "not adapted" in r.getMessage()]
    assert len(lines) == 1
    assert "2 of 4 patterns not adapted" in lines[0] and "D8-W0-P0, local-W4-P2" in lines[0]
    assert [r["status"].split(" (")[0] for r in rows] == ["dense", "adapted", "not adapted", "not adapted"]

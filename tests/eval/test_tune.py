"""tune-pattern: the greedy budgeted search (each step the best PPL drop per byte, within budget),
exact bytes, recording the default pattern, and bad input."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
from conftest import make_model

from ratplus import cli
from ratplus.eval.common import EvalModel
from ratplus.eval.tune import assemble, kv_bytes, tune_pattern
from ratplus.io.folder import load_pretrained
from ratplus.io.metadata import read_metadata

DOCS = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 8,
    "Now is the winter of our discontent made glorious summer by this sun of York. " * 8,
]
LADDER = ["D16", "D4", "dense"]


def test_greedy_steps_are_the_best_gain_per_byte_within_budget(tokenizer):
    em = EvalModel(make_model(tokenizer, seed=3), tokenizer)
    res = tune_pattern(em, DOCS, 0.5, LADDER, head_groups=2, seq_len=48)
    dense = kv_bytes(em.config, "dense", 48)
    assert res["dense_kv_bytes"] == dense and res["kv_bytes"] == kv_bytes(em.config, res["pattern"], 48)
    assert res["kv_bytes"] <= 0.5 * dense and res["kv_frac"] == res["kv_bytes"] / dense
    steps = res["steps"]
    assert steps[0]["pattern"] == "D16-W0-P0"
    ppls = {u["pattern"]: u["ppl"] for u in res["uniform"]}
    assert set(ppls) == {"D16-W0-P0", "D4-W0-P0", "dense"}
    for a, b in itertools.pairwise(steps):
        assert b["ppl"] < a["ppl"] and a["kv_bytes"] < b["kv_bytes"] <= 0.5 * dense
    assert res["ppl"] == steps[-1]["ppl"] and len(steps) >= 3
    # the first upgrade, by brute force: every single-unit upgrade, gain = PPL drop per byte
    from ratplus.config import AttentionPattern
    from ratplus.eval.ppl import stream_nll, token_stream

    stream = token_stream(DOCS, tokenizer, em.eos_id)
    rungs = [AttentionPattern.parse(p) for p in LADDER]
    gains = {}
    for u in range(4):
        choice = [0, 0, 0, 0]
        choice[u] = 1
        text = assemble(em.config, choice, rungs, 2)
        r = stream_nll(em.model, stream, text, 48, progress=False)
        gains[text] = (steps[0]["ppl"] - math.exp(r["nll_sum"] / r["tokens"])) / (
            kv_bytes(em.config, text, 48) - steps[0]["kv_bytes"]
        )
    assert em.config.canonical_pattern(max(gains, key=gains.get)) == steps[1]["pattern"]
    rival = res["best_uniform_at_or_above"]
    above = [u["kv_bytes"] for u in res["uniform"] if u["kv_bytes"] >= res["kv_bytes"]]
    assert rival["kv_bytes"] == min(above)


def test_assemble_merges_equal_neighbours(tokenizer):
    from ratplus.config import AttentionPattern

    config = make_model(tokenizer).config  # 2 layers, 4 heads
    ladder = [AttentionPattern.parse(p) for p in LADDER]
    assert assemble(config, [0, 0, 1, 2], ladder, 2) == "D16-W0-P0/D4-W0-P0:2+dense:2"
    assert assemble(config, [2, 2], ladder, 1) == "dense"


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.1"])
def test_budget_outside_0_1_is_refused(ckpt, tmp_path, budget, capsys):
    data = tmp_path / "calib.txt"
    data.write_text(DOCS[0])
    with pytest.raises(SystemExit) as exit_:  # refused by argparse, naming the flag
        cli.main(["tune-pattern", "--ckpt", str(ckpt), "--data", str(data), "--kv-budget", budget, "--quiet"])
    assert exit_.value.code == 2
    assert f"argument --kv-budget: expected a finite number in (0, 1], got '{budget}'" in capsys.readouterr().err


def test_bad_input_in_the_library(tokenizer):
    em = EvalModel(make_model(tokenizer), tokenizer)
    with pytest.raises(ValueError, match="kv_budget must be in"):
        tune_pattern(em, DOCS, 0.0, LADDER, seq_len=48)
    with pytest.raises(ValueError, match="head_groups=3"):
        tune_pattern(em, DOCS, 0.5, LADDER, head_groups=3, seq_len=48)
    with pytest.raises(ValueError, match="sparsest assignment"):
        tune_pattern(em, DOCS, 0.01, LADDER, seq_len=48)
    with pytest.raises(ValueError, match="not a fixed-slot pattern"):
        tune_pattern(em, DOCS, 0.5, ["snapkv-C8-O4", "dense"], seq_len=48)


def test_cli_records_the_default_pattern(ckpt, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(ckpt, folder)
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(DOCS))
    args = ["tune-pattern", "--ckpt", str(folder), "--data", str(data), "--kv-budget", "0.5", "--seq-len", "48"]
    assert cli.main([*args, "--ladder", ",".join(LADDER), "--out", str(tmp_path / "out"), "--record", "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    meta = read_metadata(folder)
    assert meta.default_pattern == record["pattern"] and meta.tuned["kv_budget"] == 0.5
    assert meta.adapted_pattern == "D4-W16-P2"  # the rest of the metadata is kept
    assert json.loads((tmp_path / "out" / "tune.json").read_text())["pattern"] == record["pattern"]
    load_pretrained(folder)  # the folder's manifest was re-signed: it still verifies

"""Perplexity per pattern: exact NLL / byte accounting against an independent computation, pattern
costs, adaptation status, the CLI (files written, checkpoint untouched) and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import folder_digest, make_model

from ratplus import cli
from ratplus.config import ModelConfig
from ratplus.eval.common import EvalModel, adaptation_status, pattern_costs, run_label
from ratplus.eval.ppl import evaluate_ppl, token_stream
from ratplus.io.folder import save_pretrained

DOCS = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "Now is the winter of our discontent, café naïve — déjà vu.",
    "To be, or not to be, that is the question.",
]


def _manual(model, tokenizer, docs, pattern, seq_len):
    """Independent reference: per document ids + EOS, one stream, windows of seq_len inputs; a target
    is scored unless its input is EOS; bytes = UTF-8 bytes of each document minus its first token."""
    eos = model.config.eos_token_id
    ids, nbytes = [], 0
    for d in docs:
        enc = tokenizer.encode(d, add_special_tokens=False)
        ids += [*enc.ids, eos]
        first_end = enc.offsets[0][1]
        nbytes += len(d.encode()) - len(d[:first_end].encode())
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, seq_len):
            chunk = torch.tensor([ids[s : s + seq_len + 1]])
            logp = F.log_softmax(model(chunk[:, :-1], pattern=pattern).double(), -1)[0]
            for i in range(chunk.shape[1] - 1):
                if int(chunk[0, i]) == eos:
                    continue
                nll -= float(logp[i, chunk[0, i + 1]])
                count += 1
    return nll, count, nbytes


@pytest.mark.parametrize("pattern,seq_len", [("dense", 200), ("D4-W2-P1", 29), ("local-W4-P2", 23)])
def test_ppl_matches_independent_computation(tokenizer, pattern, seq_len):
    model = make_model(tokenizer)
    em = EvalModel(model, tokenizer)
    (row,) = evaluate_ppl(em, DOCS, [pattern], seq_len=seq_len, batch_size=3, progress=False)
    nll, count, nbytes = _manual(model, tokenizer, DOCS, pattern, seq_len)
    assert row["tokens"] == count
    assert row["bytes"] == nbytes
    assert row["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert row["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert row["bpb"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)


def test_stream_layout_and_max_tokens(tokenizer):
    eos = tokenizer.token_to_id("<|endoftext|>")
    s = token_stream(DOCS, tokenizer, eos)
    n0 = len(tokenizer.encode(DOCS[0]).ids)
    assert int(s.ids[n0]) == eos and not bool(s.scored[n0 + 1]) and bool(s.scored[n0])  # EOS scored, next not
    assert int(s.nbytes.sum()) == sum(len(d.encode()) for d in DOCS)
    short = token_stream(DOCS, tokenizer, eos, max_tokens=10)
    assert len(short) == 11


def test_patterns_differ_and_full_window_equals_dense(tokenizer):
    em = EvalModel(make_model(tokenizer), tokenizer)
    rows = evaluate_ppl(em, DOCS * 3, ["dense", "D4-W64", "D4"], seq_len=64, progress=False)
    dense, wide, d4 = (r["nll"] for r in rows)
    assert wide == pytest.approx(dense, abs=1e-6)  # a 64-token window at T=64 sees every key
    assert abs(d4 - dense) > 1e-6


def test_pattern_costs_exact():
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_seq_len=8192)
    T = 64
    # D4, W0, P0: query t sees itself plus every p < t with (p + 1) % 4 == 0
    keys = sum(1 + sum(1 for p in range(t) if (p + 1) % 4 == 0) for t in range(T))
    c = pattern_costs(cfg, "D4", T)
    assert c["attn_flop_frac"] == pytest.approx(keys / (T * (T + 1) / 2))
    assert c["kv_frac"] == pytest.approx((1 + T // 4) / (T + 1))
    assert pattern_costs(cfg, "dense", T) == {"attn_flop_frac": 1.0, "kv_frac": 1.0}
    mixed = pattern_costs(cfg, "dense/D4", T)  # per-layer list: the mean of the two layers
    assert mixed["attn_flop_frac"] == pytest.approx((1 + c["attn_flop_frac"]) / 2)
    heads = pattern_costs(cfg, "D4:1+dense:3", T)  # head groups weighted by head count
    assert heads["kv_frac"] == pytest.approx((c["kv_frac"] + 3) / 4)
    big = pattern_costs(cfg, "D16-W256-P4", 4096)
    assert big["kv_frac"] == pytest.approx((4 + 256 + 1 + 4096 // 16) / 4097)
    assert pattern_costs(cfg, "D4-W256", T)["kv_frac"] == 1.0  # a window wider than the context: dense


def test_adaptation_status():
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4)
    meta = {"adapted_pattern": ["D16", "local-W64-P4"], "joint_pattern": "D64"}
    assert adaptation_status(meta, cfg, None) == "dense"
    assert adaptation_status(meta, cfg, "D16-W0-P0") == "adapted"  # same pattern, other spelling
    assert adaptation_status(meta, cfg, "local-W64-P4") == "adapted"
    assert adaptation_status(meta, cfg, "D64") == "joint-trained"
    assert adaptation_status(meta, cfg, "D4") == "not adapted (checkpoint adapted to D16-W0-P0, local-W64-P4)"
    assert adaptation_status({}, cfg, "D4") == "not adapted (no adaptation recorded)"
    assert adaptation_status({"adapted_pattern": "D16:3"}, cfg, "D4").startswith("not adapted")  # bad entry ignored


def test_cli_ppl_writes_results_and_leaves_checkpoint_untouched(ckpt, tmp_path, capsys):
    data = tmp_path / "held.txt"
    data.write_text(" ".join(DOCS))
    before = folder_digest(ckpt)
    out = tmp_path / "out"
    args = f"eval ppl --ckpt {ckpt} --data {data} --patterns dense,D4,D4-W16-P2 --seq-len 32 --out {out} --quiet"
    rc = cli.main(args.split())
    assert rc == 0
    assert folder_digest(ckpt) == before
    assert (out / "ppl.png").stat().st_size > 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the JSON line comes last
    status = {r["pattern"]: r["status"] for r in record["results"]}
    assert status == {
        "dense": "dense",
        "D4-W0-P0": "not adapted (checkpoint adapted to D4-W16-P2)",
        "D4-W16-P2": "adapted",
    }
    saved = json.loads((out / "ppl.json").read_text())
    assert [r["pattern"] for r in saved["results"]] == ["dense", "D4-W0-P0", "D4-W16-P2"]


@pytest.mark.parametrize(
    ("folder", "label"),
    [
        ("runs/tiny/final", "tiny"),
        ("runs/tiny/final-adapt-D16-W0-P0/final", "tiny-adapt-D16-W0-P0"),
        ("demo_out/models/ratplus-D16-W0-P0", "ratplus-D16-W0-P0"),
        ("models/smollm2", "smollm2"),
        ("/final", "final"),
    ],
)
def test_rows_are_labelled_by_the_run_not_its_final_folder(folder, label):
    assert run_label(folder) == label


def test_run_label_keeps_links(tmp_path):
    """The demo's stable names are links into hashed stage folders: the label is the link's name."""
    (tmp_path / "pretrain_ratplus_db64b28a" / "final").mkdir(parents=True)
    (tmp_path / "ratplus").symlink_to(tmp_path / "pretrain_ratplus_db64b28a" / "final")
    assert run_label(tmp_path / "ratplus") == "ratplus"
    assert run_label(tmp_path / "pretrain_ratplus_db64b28a" / "final") == "pretrain_ratplus_db64b28a"


def test_ppl_bad_input(ckpt, tmp_path, tokenizer, capsys):
    rc = cli.main(["eval", "ppl", "--ckpt", str(ckpt), "--data", str(tmp_path / "nope.txt"), "--quiet"])
    assert rc == 2 and "nope.txt" in capsys.readouterr().err
    data = tmp_path / "held.txt"
    data.write_text(DOCS[0])
    rc = cli.main(["eval", "ppl", "--ckpt", str(tmp_path / "no-model"), "--data", str(data), "--quiet"])
    assert rc == 2 and "no-model" in capsys.readouterr().err
    em = EvalModel(make_model(tokenizer), tokenizer)
    with pytest.raises(ValueError, match="seq_len=1024 exceeds the model's max_seq_len=512"):
        evaluate_ppl(em, DOCS, ["dense"], seq_len=1024)
    with pytest.raises(ValueError, match="D3x"):
        evaluate_ppl(em, DOCS, ["dense", "D3x"], seq_len=32)
    bare = tmp_path / "bare"
    save_pretrained(make_model(tokenizer), bare)  # no tokenizer.json
    rc = cli.main(["eval", "ppl", "--ckpt", str(bare), "--data", str(data), "--quiet"])
    assert rc == 2 and f"model folder {bare} has no tokenizer.json" in capsys.readouterr().err

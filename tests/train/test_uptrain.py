"""Uptraining (ratplus.model.uptrain, ``ratplus uptrain``): a dense model gains the recurrence and
computes the same function at step 0; the run joint-trains it, lowers the sparse loss, and writes a
RAT+ folder that keeps the source's tokenizer files; bad starts are refused."""

from __future__ import annotations

import json

import pytest
import torch

from ratplus.cli import main
from ratplus.config import ModelConfig
from ratplus.io.folder import load_metadata, load_pretrained, save_pretrained
from ratplus.model.rat import RATPlusLM
from ratplus.model.uptrain import add_recurrence, recurrent_config
from ratplus.train.config import TrainConfig
from ratplus.train.trainer import uptrain

CHAT = json.dumps({"chat_template": "{{ messages[0]['content'] }}", "eos_token": "<|endoftext|>"})


def dense_llama_like(vocab: int, seed: int = 0) -> RATPlusLM:
    """What an imported Llama looks like: no recurrence, SwiGLU, GQA, zero output-gate rows."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=128,
        apply_re=False,
        ffn_act="swiglu",
        ffn_dim=48,
        tie_embeddings=False,
    )
    model = RATPlusLM(config)
    with torch.no_grad():
        for block in model.backbone.layers:
            block.seq_layer.in_proj.weight[: config.d_model] = 0
    return model.eval()


@pytest.mark.parametrize("gate_init", [-12.0, -16.0])
def test_step_zero_computes_the_dense_function(gate_init):
    dense = dense_llama_like(300)
    recurrent = RATPlusLM(recurrent_config(dense.config)).eval()
    recurrent.load_state_dict(add_recurrence(dense.state_dict(), dense.config, gate_init))
    ids = torch.randint(0, 300, (2, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = dense(ids), recurrent(ids)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale  # g = sigmoid(gate_init) leaks that fraction of k~_{t-1}
    # and the gates are what the init says: W_f = 0, bias = gate_init
    layer = recurrent.backbone.layers[0].seq_layer
    assert torch.equal(layer.fgate_bias, torch.full((16,), gate_init))
    assert layer.in_proj.weight[-16:].abs().sum() == 0


def test_a_model_with_the_recurrence_or_a_bad_gate_is_refused():
    dense = dense_llama_like(300)
    with pytest.raises(ValueError, match="already has the recurrence"):
        recurrent_config(recurrent_config(dense.config))
    with pytest.raises(ValueError, match="gate_init must be a finite number"):
        add_recurrence(dense.state_dict(), dense.config, float("nan"))
    with pytest.raises(ValueError, match=r"gate_bias .* needs apply_re=True"):
        ModelConfig(apply_re=False, gate_bias=True)


def test_uptrain_run_lowers_the_sparse_loss_and_keeps_the_tokenizer_files(tmp_path, data_dir, tokenizer, capsys):
    src = tmp_path / "dense"
    save_pretrained(
        dense_llama_like(tokenizer.get_vocab_size()),
        src,
        tokenizer=tokenizer,
        extra_files={"tokenizer_config.json": CHAT},
    )
    out = tmp_path / "up"
    args = [
        "uptrain",
        "--init",
        str(src),
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--steps",
        "12",
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--eval-interval",
        "0",
        "--no-progress",
    ]
    assert main([*args, "--dry-run"]) == 0
    assert "fits" in capsys.readouterr().out and not out.exists()
    assert main(args) == 0
    final = load_pretrained(out / "final")
    assert final.config.apply_re and final.config.gate_bias and final.config.ffn_act == "swiglu"
    meta = load_metadata(out / "final")
    assert meta["task"] == "uptrain" and meta["sparse_pattern"] == "D64-W0-P0" and meta["init_from"] == str(src)
    assert (out / "final" / "tokenizer_config.json").read_text() == CHAT
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    sparse = [r["losses"]["D64-W0-P0"] for r in log if "losses" in r]
    assert len(sparse) == 12 and sum(sparse[-3:]) < sum(sparse[:3])
    # the closed gates train: uptraining's Adam eps (1e-12) lets their tiny gradients take normal steps
    # (mean |W_f| 0.0147 here; 0.0052 with the default eps 1e-8, whose damping this guards against)
    for block in final.backbone.layers:
        assert block.seq_layer.in_proj.weight[-16:].abs().mean() > 0.01
        assert (block.seq_layer.fgate_bias + 12).abs().mean() > 0.008
    assert json.loads((out / "checkpoints" / "step_0000012" / "train_config.json").read_text())["adam_eps"] == 1e-12


def test_uptrain_refuses_a_rat_model_and_missing_data(tmp_path, tokenizer, data_dir):
    torch.manual_seed(0)
    rat = RATPlusLM(ModelConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size()))
    save_pretrained(rat, tmp_path / "rat", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="already has the recurrence"):
        uptrain(tmp_path / "rat", data=str(data_dir), steps=1, out_dir=str(tmp_path / "o"), dry_run=True)
    save_pretrained(dense_llama_like(tokenizer.get_vocab_size()), tmp_path / "dense", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="records no training data"):
        uptrain(tmp_path / "dense", steps=1)


def test_gate_curriculum_moves_the_biases_on_its_schedule(tmp_path, data_dir, tokenizer):
    """gate_open=0.5 over 4 steps: the biases go -12 -> 0 in the first two steps (+6 before each), on top of
    training (here an LR of 1e-12, so only the schedule moves them)."""
    save_pretrained(dense_llama_like(tokenizer.get_vocab_size()), tmp_path / "dense", tokenizer=tokenizer)
    common = dict(data=str(data_dir), steps=4, seq_len=64, batch_size=4, lr=1e-12, min_lr=1e-12, progress=False)
    final = uptrain(tmp_path / "dense", out_dir=str(tmp_path / "up"), gate_open=0.5, gate_target=0.0, **common)
    for block in load_pretrained(final).backbone.layers:
        torch.testing.assert_close(block.seq_layer.fgate_bias, torch.zeros(16), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"gate_open .* needs uptrain"):
        TrainConfig(steps=1, gate_open=0.5).validate()


def test_uptrain_dry_run_checks_the_grown_weights(tmp_path, tokenizer, data_dir):
    """The dry run grows the dense weights' shapes (add_recurrence on meta tensors) and compares them
    with the model, refusing a mismatch with the run's own message."""
    save_pretrained(dense_llama_like(tokenizer.get_vocab_size()), tmp_path / "dense", tokenizer=tokenizer)
    args = dict(data=str(data_dir), steps=1, seq_len=32, out_dir=str(tmp_path / "o"))
    assert uptrain(tmp_path / "dense", dry_run=True, **args).fits
    errors = []
    for dry in (True, False):
        with pytest.raises(ValueError, match="does not match the model config: shape mismatches") as e:
            uptrain(tmp_path / "dense", dry_run=dry, model_overrides={"ffn_dim": 40}, **args)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and not (tmp_path / "o").exists()

"""MQAR recall probe: generator invariants, accuracy, a tiny end-to-end run, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ratplus import RATPlusLM
from ratplus.cli import main
from ratplus.eval.recall import (
    RecallTask,
    answer_accuracy,
    answer_matrix,
    carrier_attention,
    demo_config,
    elimination_floor,
    evaluate_accuracy,
    gate_profile,
    induction_attention,
    make_batch,
    quick_config,
    recall_config,
    run_recall_probe,
)

TASK = RecallTask(pairs=5, spread=8, seq_len=64, filler_vocab=6, key_vocab=12, value_vocab=10)


def _kinds(task: RecallTask, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    F, K = task.filler_vocab, task.key_vocab
    return ids < F, (ids >= F) & (ids < F + K), ids >= F + K


def test_body_holds_each_pair_once_at_most_one_per_chunk():
    b = make_batch(TASK, 32, seed=3)
    assert b.input_ids.shape == b.labels.shape == (32, TASK.seq_len)
    assert int(b.input_ids.max()) < TASK.vocab_size
    body = b.input_ids[:, : TASK.body_len]
    filler, key, value = _kinds(TASK, body)
    assert filler.sum(1).eq(TASK.body_len - 2 * TASK.pairs).all()
    assert key.sum(1).eq(TASK.pairs).all() and value.sum(1).eq(TASK.pairs).all()
    for row in range(32):
        pos = b.pair_pos[row]
        chunks = pos // TASK.spread
        assert len(set(chunks.tolist())) == TASK.pairs  # one pair per chunk at most
        assert ((pos + 1) // TASK.spread == chunks).all()  # both tokens inside their chunk
        assert key[row, pos].all() and value[row, pos + 1].all()  # adjacent "k v"
        keys = body[row, pos]
        assert len(set(keys.tolist())) == TASK.pairs  # distinct keys: each query has one answer


def test_queries_ask_every_key_once_and_targets_are_the_answers():
    b = make_batch(TASK, 16, seed=5)
    for row in range(16):
        ids, lab, q = b.input_ids[row], b.labels[row], b.query_pos[row]
        pairs = {int(ids[p]): int(ids[p + 1]) for p in b.pair_pos[row]}
        asked = ids[q].tolist()
        assert sorted(asked) == sorted(pairs)  # every key queried once, order random
        assert ids[q + 1].tolist() == [pairs[k] for k in asked]  # each query followed by its value
        assert lab[q].tolist() == ids[q + 1].tolist()  # the target at a query key is the next token
        mask = lab != -100
        assert int(mask.sum()) == TASK.pairs and mask[q].all()  # targets only at the answers
    orders = {tuple(make_batch(TASK, 1, seed=5, index=i).input_ids[0, b.query_pos[0]].tolist()) for i in range(8)}
    assert len(orders) > 1


def test_pairs_not_biased_to_chunk_ends():
    task = RecallTask(pairs=6, spread=16, seq_len=128)
    b = make_batch(task, 512, seed=0)
    at_end = ((b.pair_pos + 2) % task.spread == 0).float().mean().item()  # value token on a chunk end
    assert abs(at_end - 1 / (task.spread - 1)) < 0.02


def test_packed_variant_puts_pairs_side_by_side():
    task = RecallTask(pairs=4, spread=8, seq_len=48, packed=True)
    b = make_batch(task, 8, seed=1)
    assert (b.pair_pos.diff(dim=1) == 2).all()
    assert (b.pair_pos[:, -1] + 2 <= task.body_len).all()


def test_same_seed_same_batch_and_splits_disjoint():
    a, b = make_batch(TASK, 8, seed=7, index=2), make_batch(TASK, 8, seed=7, index=2)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, make_batch(TASK, 8, seed=7, index=3).input_ids)
    assert not torch.equal(a.input_ids, make_batch(TASK, 8, seed=8, index=2).input_ids)
    train = {tuple(r) for i in range(20) for r in make_batch(TASK, 16, 7, "train", i).input_ids.tolist()}
    test = {tuple(r) for i in range(20) for r in make_batch(TASK, 16, 7, "test", i).input_ids.tolist()}
    assert len(train) == len(test) == 320 and not train & test


def test_answer_accuracy_hand_made():
    labels = torch.full((2, 4), -100)
    labels[0, 1], labels[0, 3], labels[1, 2] = 5, 2, 7
    logits = torch.zeros(2, 4, 8)
    logits[0, 1, 5] = 1.0  # right
    logits[0, 3, 6] = 1.0  # wrong: 6 instead of 2
    logits[1, 2, 7] = 1.0  # right
    logits[1, 0, 3] = 9.0  # an unscored position does not count
    assert answer_accuracy(logits, labels) == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        (dict(pairs=9, spread=8, seq_len=64), "pairs"),  # 46-token body: 5 chunks
        (dict(spread=1), "spread"),
        (dict(pairs=6, key_vocab=5), "key_vocab"),
        (dict(pairs=6, value_vocab=4), "value_vocab"),
        (dict(pairs=20, spread=2, seq_len=60), "seq_len"),
        (dict(filler_vocab=0), "filler_vocab"),
    ],
)
def test_bad_task_names_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        RecallTask(**kwargs)


def test_bad_probe_options():
    with pytest.raises(ValueError, match="joint_pattern"):
        recall_config(quick=True, joint_pattern="D0x")
    with pytest.raises(ValueError, match="dense_warmup_steps"):
        recall_config(quick=True, steps=10, dense_warmup_steps=20)
    with pytest.raises(ValueError, match="unknown recall option"):
        recall_config(quick=True, colour="red")
    with pytest.raises(ValueError, match="models"):
        recall_config(quick=True, models=("mamba",))


def test_demo_config_is_valid_and_ratplus_only():
    for quick in (False, True):
        cfg = demo_config(quick)
        cfg.validate()
        assert cfg.models == ("ratplus",)
    assert demo_config().steps > demo_config(quick=True).steps


class _Oracle(torch.nn.Module):
    """Answers every query right except those at query index ``miss`` (it answers a filler token there)."""

    def __init__(self, batches, vocab, miss):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.by_ids = {tuple(b.input_ids[i].tolist()): (b, i) for b in batches for i in range(len(b.input_ids))}
        self.vocab, self.miss = vocab, miss

    def forward(self, ids, pattern=None):
        logits = torch.zeros(*ids.shape, self.vocab)
        for r, row in enumerate(ids.tolist()):
            b, i = self.by_ids[tuple(row)]
            for j, q in enumerate(b.query_pos[i].tolist()):
                logits[r, q, 0 if j == self.miss else int(b.labels[i, q])] = 1.0
        return logits


def test_answer_matrix_orders_answers_by_query_index():
    test = [make_batch(TASK, 4, 0, "test", i) for i in range(2)]
    right = answer_matrix(_Oracle(test, TASK.vocab_size, miss=2), test, "dense")
    assert right.shape == (8, TASK.pairs) and right.dtype == torch.bool
    assert not right[:, 2].any() and right[:, [0, 1, 3, 4]].all()
    assert evaluate_accuracy(_Oracle(test, TASK.vocab_size, miss=0), test, "dense") == pytest.approx(4 / 5)


def test_elimination_floor():
    floor = elimination_floor(6)
    assert floor[0] == pytest.approx(1 / 6) and floor[-1] == 1.0
    assert sum(floor) / 6 == pytest.approx(0.408, abs=1e-3)  # what a model that binds nothing scores


def test_tiny_end_to_end(tmp_path):
    cfg = quick_config(steps=8, adapt_steps=3, eval_batches=1, progress=False)
    rec = run_recall_probe(cfg, tmp_path)
    rows = rec["rows"]
    assert len(rows) == 2 * len(cfg.patterns)
    assert all(0.0 <= r["acc"] <= 1.0 for r in rows)
    adapted = {(r["model"], r["pattern"]) for r in rows if r["acc_adapted"] is not None}
    assert adapted == {(m, p) for m in ("ratplus", "baseline") for p in cfg.adapt_patterns}
    saved = json.loads((tmp_path / "recall.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert saved["adapt_budget"]["steps"] == 3 and (tmp_path / "recall.png").stat().st_size > 0
    # the weights after pretraining are reloadable: the same zero-shot accuracy without training again
    again = run_recall_probe(
        quick_config(steps=8, adapt_steps=0, eval_batches=1, models=("ratplus",), progress=False),
        tmp_path / "again",
        load_from=tmp_path,
        plot=False,
    )
    first = {r["pattern"]: r["acc"] for r in rows if r["model"] == "ratplus"}
    assert {r["pattern"]: r["acc"] for r in again["rows"]} == first
    gates = rec["models"]["ratplus"]["gates"]
    assert len(gates) == cfg.num_layers and all(0 < g["filler"] < 1 for g in gates)
    assert rec["models"]["baseline"]["gates"] == []
    assert rec["elimination_floor"] == elimination_floor(cfg.task.pairs)
    for r in rows:
        assert len(r["by_query"]) == cfg.task.pairs and 0 <= r["first_query"] <= 1
        assert sum(r["by_query"]) / cfg.task.pairs == pytest.approx(r["acc"])
        if r["acc_adapted"] is not None:
            assert r["first_query"] == r["by_query_adapted"][0]


@pytest.mark.parametrize("constant", [False, True])
def test_adaptation_lr_schedule(monkeypatch, constant):
    """Adaptation starts at adapt_lr_mult x lr; cosine ends at min_lr, the constant schedule stays put."""
    from ratplus.eval import recall as R
    from ratplus.eval import recall_train

    seen: list[float] = []
    real = recall_train.optimizer_steps

    def spy(model, opt, batch, patterns, **kw):
        seen.append(opt.param_groups[0]["lr"])
        return real(model, opt, batch, patterns, **kw)

    monkeypatch.setattr(recall_train, "optimizer_steps", spy)  # the probe's training step lives there
    cfg = quick_config(adapt_steps=4, adapt_lr_mult=0.5, adapt_constant_lr=constant, progress=False)
    model = RATPlusLM(cfg.model_config(baseline=False))
    R.adapt(model, cfg, "D8")
    assert seen[0] == pytest.approx(0.5 * cfg.lr) and len(seen) == 4
    if constant:
        assert seen == [seen[0]] * 4
    else:
        assert seen[0] > seen[1] > seen[2] > seen[3] > cfg.min_lr


def test_adaptation_curve(tmp_path):
    cfg = quick_config(steps=6, adapt_steps=5, adapt_eval_every=2, eval_batches=1, models=("ratplus",), progress=False)
    rec = run_recall_probe(cfg, tmp_path)
    rows = {r["pattern"]: r for r in rec["rows"]}
    for p in cfg.adapt_patterns:
        curve = rows[p]["adapt_curve"]
        assert [c["step"] for c in curve] == [2, 4, 5]  # every 2 steps and the last one
        assert curve[-1]["acc"] == rows[p]["acc_adapted"] and curve[-1]["dense"] == rows[p]["acc_adapted_dense"]
    assert "adapt_curve" not in rows["dense"] and (tmp_path / "recall.png").stat().st_size > 0


def test_gate_profile_separates_token_kinds():
    cfg = quick_config()
    from ratplus.model.rat import RATPlusLM

    torch.manual_seed(0)
    model = RATPlusLM(cfg.model_config(baseline=False))
    prof = gate_profile(model, make_batch(cfg.task, 4), cfg.task)
    assert set(prof[0]) == {"filler", "key", "value", "query_key"}


def _query_blind_model(cfg, baseline: bool):
    """A fresh model of ``cfg`` whose queries are all zero (q rows of in_proj zeroed): uniform attention."""
    from ratplus.model.rat import RATPlusLM

    torch.manual_seed(0)
    model = RATPlusLM(cfg.model_config(baseline=baseline))
    C = cfg.d_model
    for block in model.backbone.layers:
        block.seq_layer.in_proj.weight.data[C : 2 * C] = 0  # rows of q
    return model


def test_carrier_attention_uniform_queries():
    """With q = 0 every visible key gets the same weight: the carrier's mass is 1 / |S(t)|."""
    from ratplus.config import AttentionPattern

    cfg = quick_config()
    model = _query_blind_model(cfg, baseline=False)
    b = make_batch(cfg.task, 6, seed=2)
    got = carrier_attention(model, b, cfg.task, "D8")
    pattern = AttentionPattern.parse("D8")
    expected = torch.tensor([1 / pattern.keys_per_query(int(t)) for t in b.query_pos.flatten()]).mean()
    assert len(got) == cfg.num_layers and got[0]["queries"] == b.query_pos.numel()
    for layer in got:
        assert layer["carrier_mass"] == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="dilated"):
        carrier_attention(model, b, cfg.task, "dense")


@pytest.mark.parametrize("baseline", [False, True])
def test_induction_attention_uniform_queries(baseline):
    """With q = 0 the value at p + 1 spreads its weight over p + 2 keys, the query at t over t + 1."""
    cfg = quick_config()
    model = _query_blind_model(cfg, baseline=baseline)
    b = make_batch(cfg.task, 6, seed=2)
    got = induction_attention(model, b)
    prev = (1 / (b.pair_pos.double() + 2)).mean()
    look = (1 / (b.query_pos.double() + 1)).mean()
    assert len(got) == cfg.num_layers
    for layer in got:
        assert layer["prev_mass"] == pytest.approx(float(prev), rel=1e-5)
        assert layer["lookup_mass"] == pytest.approx(float(look), rel=1e-5)


def test_induction_attention_finds_a_handmade_circuit(monkeypatch):
    """Layer 1 a previous-token head, layer 2 a head that looks up the asked value: both read 1."""
    import ratplus.eval.recall as recall
    from ratplus.model.rat import RATPlusLM

    cfg = quick_config()
    b = make_batch(cfg.task, 5, seed=3)
    B, T = b.input_ids.shape
    prev = torch.zeros(B, 2, T, T)
    prev[:, :, torch.arange(1, T), torch.arange(T - 1)] = 1
    prev[:, :, 0, 0] = 1
    look = prev.clone()
    for i in range(B):
        for q in b.query_pos[i].tolist():
            key = int(b.input_ids[i, q])
            k_pos = int(b.pair_pos[i][b.input_ids[i, b.pair_pos[i]] == key][0])
            look[i, :, q] = 0
            look[i, 1, q, k_pos + 1] = 0.9  # head 1 only: the best head counts
            look[i, 1, q, 0] = 0.1
    monkeypatch.setattr(recall, "_attention_weights", lambda model, ids, pattern: iter([prev, look]))
    got = induction_attention(RATPlusLM(cfg.model_config(baseline=True)), b)
    assert got[0]["prev_mass"] == 1.0 and got[0]["lookup_top"] == 0.0
    assert got[1]["lookup_mass"] == pytest.approx(0.9) and got[1]["lookup_top"] == 1.0


def test_cli_quick(tmp_path, capsys):
    out = tmp_path / "recall"
    assert main(["eval", "recall", "--quick", "--steps", "6", "--adapt-steps", "2", "--quiet", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["eval"] == "recall" and summary["adapt_budget"]["steps"] == 2
    assert (out / "recall.json").is_file() and (out / "recall.png").is_file()


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    code = main(["eval", "recall", "--quick", "--pairs", "9", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("ratplus eval recall: error:") and "pairs=9" in err and "\n" not in err


def test_load_verifies_the_saved_model_folder(tmp_path):
    """The probe saves each pretrained model as a model folder (safetensors + manifest); ``--load``
    verifies it and refuses another architecture, a damaged file or an unsafe pickle, before training."""
    import os

    from ratplus.eval.recall import load_probe_model

    cfg = quick_config(steps=2, adapt_steps=0, eval_batches=1, models=("ratplus",), progress=False)
    run_recall_probe(cfg, tmp_path / "p", plot=False)
    assert {f.name for f in (tmp_path / "p" / "ratplus").iterdir()} >= {"model.safetensors", "manifest.json"}
    with pytest.raises(ValueError, match=r"another model than this probe builds: d_model=32 \(this probe: 64\)"):
        run_recall_probe(dataclasses.replace(cfg, d_model=64), tmp_path / "q", load_from=tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="holds no baseline model"):
        run_recall_probe(dataclasses.replace(cfg, models=("baseline",)), tmp_path / "q", load_from=tmp_path / "p")
    weights = tmp_path / "p" / "ratplus" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    with pytest.raises(ValueError, match="SHA-256"):
        run_recall_probe(cfg, tmp_path / "q", load_from=tmp_path / "p")
    # probes written before the folder format: <name>.pt, read weights-only
    old = tmp_path / "old"
    old.mkdir()
    model = RATPlusLM(cfg.model_config(False))
    torch.save(model.state_dict(), old / "ratplus.pt")
    loaded = load_probe_model(old, "ratplus", cfg.model_config(False))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    class Unsafe:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"w": Unsafe()}, old / "ratplus.pt")
    with pytest.raises(ValueError, match=r"cannot read .*ratplus\.pt: damaged, truncated or not a weights file"):
        load_probe_model(old, "ratplus", cfg.model_config(False))
    torch.save(model.state_dict(), old / "ratplus.pt")
    (old / "ratplus.pt").write_bytes((old / "ratplus.pt").read_bytes()[:300])
    with pytest.raises(ValueError, match="damaged, truncated"):
        load_probe_model(old, "ratplus", cfg.model_config(False))

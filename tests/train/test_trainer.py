import copy
import dataclasses
import importlib.util
import itertools
import json
import math
import shutil

import pytest
import torch

from ratplus import ModelConfig, RATPlusLM
from ratplus.io.folder import load_config, load_metadata, load_pretrained
from ratplus.train import trainer as T
from ratplus.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ratplus.train.config import TrainConfig
from ratplus.train.data import SFTDataset, TokenDataset, read_sft_records
from ratplus.train.step import lr_factor, optimizer_steps
from ratplus.train.trainer import adapt, sft, train


def _cfg(tmp_path, data_dir, name="run", **kw) -> TrainConfig:
    base = dict(
        out_dir=str(tmp_path / name),
        model="tiny",
        data=str(data_dir),
        seq_len=32,
        batch_size=2,
        steps=4,
        eval_interval=2,
        eval_batches=2,
        ckpt_interval=2,
        progress=False,
        sparse_pattern="D4-W0-P0",  # D=64 would see no dilated key at T=32
    )
    base.update(kw)
    return TrainConfig(**base)


def _log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def _train_records(out_dir) -> list[tuple]:
    """Everything in the log that must repeat exactly: step, losses, lr, grad norm, tokens, val losses."""
    keep = ("step", "losses", "lr", "grad_norm", "tokens", "val_loss")
    return [tuple(json.dumps(r.get(k), sort_keys=True) for k in keep) for r in _log(out_dir)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    """A tiny model pretrained 4 steps with joint training (module-wide, read-only)."""
    out = tmp_path_factory.mktemp("pre")
    return train(_cfg(out, data_dir, steps=4))


def test_joint_step_is_sparse_step_then_dense_step_on_the_same_batch():
    """optimizer_steps == the recipe written out by hand: sparse loss, backward, clip, optimizer step,
    zero; then dense on the same batch. Two micro-batches accumulate like one batch of both.
    (SGD here: Adam's g / sqrt(v) would amplify float-rounding differences of near-zero gradients.)"""
    torch.manual_seed(0)
    model = RATPlusLM(ModelConfig.from_preset("tiny"))
    ref = copy.deepcopy(model)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
    ids = torch.randint(0, 256, (4, 41))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :5] = -100  # ignored targets change the normalisation: must be global over micro-batches
    patterns = ["D4-W2-P1", "dense"]
    losses, _ = optimizer_steps(model, opt, [(x[:2], y[:2]), (x[2:], y[2:])], patterns, grad_clip=0.05)
    want = {}
    for pattern in patterns:
        loss = ref(x, pattern=pattern, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
        want[pattern] = loss.item()
    assert list(losses) == patterns
    for pattern in want:
        assert losses[pattern] == pytest.approx(want[pattern], rel=1e-6)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    # the order matters: dense-then-sparse gives other weights
    torch.manual_seed(0)
    swapped = RATPlusLM(ModelConfig.from_preset("tiny"))
    optimizer_steps(swapped, torch.optim.SGD(swapped.parameters(), lr=0.5), [(x, y)], patterns[::-1], grad_clip=0.05)
    w = lambda m: m.backbone.layers[0].seq_layer.in_proj.weight  # noqa: E731
    assert not torch.allclose(w(swapped), w(ref), rtol=1e-5, atol=1e-7)
    # AdamW: two optimizer steps per batch
    adam = torch.optim.AdamW(model.parameters())
    optimizer_steps(model, adam, [(x, y)], patterns)
    assert all(s["step"].item() == 2 for s in adam.state.values())


def test_dense_warmup_trains_dense_only_then_joint(tmp_path, data_dir):
    """dense_warmup=0.5 of 4 steps: batches 1-2 take only the dense optimizer step, 3-4 the joint pair;
    the first two steps equal a dense-only run's (same data, same schedule)."""
    warm = train(_cfg(tmp_path, data_dir, "warm", dense_warmup=0.5, eval_interval=0))
    dense = train(_cfg(tmp_path, data_dir, "dense", joint_train=False, eval_interval=0))
    steps = [r for r in _log(warm.parent) if "loss" in r]
    assert [list(r["losses"]) for r in steps] == [["dense"], ["dense"], ["D4-W0-P0", "dense"], ["D4-W0-P0", "dense"]]
    ref = [r for r in _log(dense.parent) if "loss" in r]
    assert [r["losses"] for r in steps[:2]] == [r["losses"] for r in ref[:2]]
    assert steps[2]["losses"]["dense"] != ref[2]["losses"]["dense"]  # a sparse step came first this time
    assert json.loads((warm.parent / "train_config.json").read_text())["dense_warmup_steps"] == 2


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    f = [lr_factor(s, 100, 10, 8e-4, 1e-6) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))  # monotone decay after warmup
    assert f[55] * 8e-4 == pytest.approx(1e-6 + (8e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(100, 100, 10, 8e-4, 1e-6) * 8e-4 == pytest.approx(1e-6)
    assert lr_factor(0, 10, 0, 1e-4, 1e-6) == 1.0  # no warmup: the first step runs at the peak


@pytest.mark.parametrize(
    "setup",
    [dict(sampling="random", grad_accum=2), dict(sampling="ordered", joint_train=False, train_pattern="D4-W4-P1")],
)
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, data_dir, monkeypatch, setup):
    kw = dict(steps=6, eval_interval=3, ckpt_interval=2, keep_last=2, **setup)
    full = train(_cfg(tmp_path, data_dir, "full", **kw))

    real_step = T._Run.train_step

    def crash_at_5(self, batch):
        if self.step == 4:  # checkpoints exist for steps 2 and 4; step 5 never finishes
            raise RuntimeError("simulated crash")
        return real_step(self, batch)

    monkeypatch.setattr(T._Run, "train_step", crash_at_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_cfg(tmp_path, data_dir, "cut", **kw))
    monkeypatch.setattr(T._Run, "train_step", real_step)
    cut = tmp_path / "cut"
    assert [s for s, _ in list_checkpoints(cut / "checkpoints")] == [2, 4] and not (cut / "final").exists()
    resumed = train(_cfg(tmp_path, data_dir, "cut", resume=True, **kw))

    assert _train_records(full.parent) == _train_records(resumed.parent)
    assert [r["step"] for r in _log(resumed.parent) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (full / "model.safetensors").read_bytes() == (resumed / "model.safetensors").read_bytes()
    a = load_checkpoint(full.parent / "checkpoints" / "step_0000006")
    b = load_checkpoint(cut / "checkpoints" / "step_0000006")
    for key in ("data", "scheduler", "tokens_seen"):
        assert a.trainer_state[key] == b.trainer_state[key]
    for name, state in a.optimizer_state["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b.optimizer_state["state"][name][key]), (name, key)


def test_resume_refuses_damaged_checkpoint_and_skips_it_when_automatic(tmp_path, pretrained, data_dir, caplog):
    run = tmp_path / "copy"
    shutil.copytree(pretrained.parent, run)
    step4 = run / "checkpoints" / "step_0000004"
    weights = step4 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        train(_cfg(tmp_path, data_dir, "copy", resume=str(step4)))
    # automatic resume falls back to step 2 and redoes steps 3-4
    final = train(_cfg(tmp_path, data_dir, "copy", resume=True))
    assert "skipping damaged checkpoint" in caplog.text
    assert (final / "model.safetensors").read_bytes() == (pretrained / "model.safetensors").read_bytes()


def test_existing_checkpoints_need_resume(tmp_path, pretrained, data_dir):
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_cfg(pretrained.parent.parent, data_dir, pretrained.parent.name))


def test_pretrained_folder_and_metadata(pretrained):
    meta = load_metadata(pretrained)
    assert meta["task"] == "pretrain" and meta["joint_train"] is True and meta["adapted_pattern"] is None
    assert meta["tokens_seen"] == 4 * 2 * 32 and meta["sparse_pattern"] == "D4-W0-P0"
    assert set(meta["val_loss"]) == {"D4-W0-P0", "dense"}
    config = load_config(pretrained)
    assert config.vocab_size == 300 and config.eos_token_id == 0  # vocabulary taken from the data
    load_pretrained(pretrained)
    resolved = json.loads((pretrained.parent / "train_config.json").read_text())
    assert resolved["step_patterns"] == ["D4-W0-P0", "dense"] and resolved["steps"] == 4


def test_baseline_joint_trains_with_a_local_window(tmp_path, data_dir):
    out = train(_cfg(tmp_path, data_dir, baseline=True, sparse_pattern=None, steps=1, eval_interval=0))
    assert load_config(out).apply_re is False
    assert list(_log(out.parent)[0]["losses"]) == ["local-W64-P0", "dense"]


def test_gqa_model_joint_trains_and_reloads(tmp_path, data_dir):
    out = train(_cfg(tmp_path, data_dir, model_overrides={"num_kv_heads": 1}, steps=1, eval_interval=0))
    config = load_config(out)
    assert config.num_kv_heads == 1 and config.num_heads == 4
    assert list(_log(out.parent)[0]["losses"]) == ["D4-W0-P0", "dense"]
    assert load_pretrained(out).backbone.layers[0].seq_layer.in_proj.weight.shape == (2 * 32 + 3 * 8, 32)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(seq_len=1000), ValueError, "seq_len=1000 is above the model's max_seq_len=256"),
        (dict(sparse_pattern="D0"), ValueError, "bad attention pattern 'D0'"),
        (dict(joint_train=False, train_pattern="X16-W2"), ValueError, "bad attention pattern 'X16-W2'"),
        (dict(eval_patterns=["D4:3"]), ValueError, "bad attention pattern 'D4:3'"),
        (dict(steps=None), ValueError, "steps or tokens"),
        (dict(model_overrides={"vocab_size": 256}), ValueError, "uses 300 token ids but the model's vocab_size is 256"),
        (dict(data="/nonexistent/data"), FileNotFoundError, "data folder not found"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
        (dict(model="huge"), ValueError, "unknown preset"),
        (dict(warmup=1.5), ValueError, "warmup"),
        (dict(dense_warmup=1.0), ValueError, "dense_warmup is a fraction"),
        (dict(dense_warmup=float("nan")), ValueError, "dense_warmup must be a finite number"),
        (dict(dense_warmup=0.5, joint_train=False), ValueError, "dense_warmup delays joint training"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, data_dir, change, error, match):
    with pytest.raises(error, match=match):
        train(_cfg(tmp_path, data_dir, **change))
    assert not (tmp_path / "run" / "log.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_too_little_data_for_the_window(tmp_path, data_dir):
    n = TokenDataset(data_dir / "val").num_tokens  # a window needs seq_len + 1 tokens
    overrides = {"max_seq_len": n}
    with pytest.raises(ValueError, match="too few for one window"):
        train(_cfg(tmp_path, data_dir, data=str(data_dir / "val"), model_overrides=overrides, seq_len=n))


def test_adapt_trains_only_the_target_pattern_at_a_tenth_of_the_lr(tmp_path, pretrained):
    out = adapt(pretrained, "D4-W8-P2", out_dir=tmp_path / "ad", steps=2, seq_len=32, batch_size=2, progress=False)
    meta = load_metadata(out)
    assert meta["adapted_pattern"] == "D4-W8-P2" and meta["joint_train"] is False and meta["task"] == "adapt"
    log = [r for r in _log(out.parent) if "loss" in r]
    assert all(list(r["losses"]) == ["D4-W8-P2"] for r in log)
    assert log[0]["lr"] == pytest.approx(0.1 * 8e-4)  # no warmup: the first step runs at the peak
    assert set(meta["val_loss"]) == {"D4-W8-P2", "dense"}
    assert meta["init_from"] == str(pretrained.resolve()) and meta["init_tokens_seen"] == 256
    with pytest.raises(ValueError, match="bad attention pattern"):
        adapt(pretrained, "D16-Q4", out_dir=tmp_path / "bad", steps=1, progress=False)


def test_sft_loss_covers_answers_only(tmp_path, pretrained):
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"Question {i}: say the word. ", "answer": ["yes", "no", "maybe"][i % 3]} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = sft(pretrained, path, out_dir=tmp_path / "sft", steps=1, batch_size=2, progress=False, seed=7)
    logged = _log(out.parent)[0]["loss"]
    # the same batch scored by hand with the starting model: mean over answer (+ EOS) targets only
    model = load_pretrained(pretrained)
    ds = SFTDataset(read_sft_records(path), load_pretrained.__globals__["load_tokenizer"](pretrained), max_len=256)
    x, y = ds.batch(0, 2, seed=8)
    assert (y == -100).sum() > y.shape[0]  # prompts masked
    with torch.no_grad():
        want = model(x, labels=y).loss.item()
    assert logged == pytest.approx(want, rel=1e-5)
    assert load_metadata(out)["task"] == "sft"


def test_sft_resume_equals_uninterrupted(tmp_path, pretrained):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}? ", "answer": f"A{i}."}) + "\n" for i in range(5)))
    kw = dict(steps=3, batch_size=2, progress=False, ckpt_interval=1)
    full = sft(pretrained, path, out_dir=tmp_path / "a", **kw)
    cut = tmp_path / "b"
    sft(pretrained, path, out_dir=cut, **kw)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step_0000003")
    resumed = sft(pretrained, path, out_dir=cut, resume=True, **kw)
    assert _train_records(full.parent) == _train_records(cut)
    assert (full / "model.safetensors").read_bytes() == (resumed / "model.safetensors").read_bytes()


def test_token_budget_sets_the_steps(tmp_path, data_dir):
    out = train(_cfg(tmp_path, data_dir, steps=None, tokens=130, eval_interval=0, ckpt_interval=0))
    assert load_metadata(out)["steps"] == 3  # ceil(130 / (2 x 32))
    assert [s for s, _ in list_checkpoints(out.parent / "checkpoints")] == [3]  # interval 0: only the end


def test_default_data_is_the_bundled_corpus(tmp_path, monkeypatch, docs):
    """Without --data, the plays are tokenized once into <out>/data (train and val), then reused."""
    calls = []

    def few_plays(split="train"):
        calls.append(split)
        return docs[:3] if split == "train" else docs[3:4]

    monkeypatch.setattr("ratplus.train.run.shakespeare_documents", few_plays)  # the run prepares it
    cfg = TrainConfig(
        out_dir=str(tmp_path / "r"), model="tiny", model_overrides={"vocab_size": 300}, seq_len=32, batch_size=2,
        steps=1, eval_batches=1, progress=False,
    )  # fmt: skip
    out = train(cfg)
    assert (tmp_path / "r" / "data" / "train" / "meta.json").is_file() and load_config(out).vocab_size == 300
    assert set(load_metadata(out)["val_loss"]) == {"D64-W0-P0", "dense"}
    n = len(calls)
    train(dataclasses.replace(cfg, steps=2, resume=True))
    assert len(calls) == n  # prepared once


def test_tensorboard_flag(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, steps=1, tensorboard=True, eval_interval=0)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            train(cfg)
    else:
        out = train(cfg)
        assert any((out.parent / "tensorboard").iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_training_and_resume(tmp_path, data_dir):
    kw = dict(device="cuda", steps=4, ckpt_interval=2)
    full = train(_cfg(tmp_path, data_dir, "a", **kw))
    cut = tmp_path / "b"
    train(_cfg(tmp_path, data_dir, "b", **kw))
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step_0000004")
    train(_cfg(tmp_path, data_dir, "b", resume=True, **kw))
    la = [r["losses"] for r in _log(full.parent) if "losses" in r]
    lb = [r["losses"] for r in _log(cut) if "losses" in r]
    assert len(la) == len(lb) == 4 and all(math.isfinite(v) for r in la for v in r.values())
    for a, b in zip(la, lb):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-3)  # bf16 kernels need not be bit-deterministic
    assert load_pretrained(full).embedding.wte.weight.dtype == torch.float32  # master weights stay fp32


def test_adapt_refuses_a_tampered_model_folder(tmp_path, pretrained):
    copy_dir = tmp_path / "model"
    shutil.copytree(pretrained, copy_dir)
    weights = copy_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0xFF  # one flipped byte inside a weight: safetensors would load it silently
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        adapt(copy_dir, "D4", out_dir=tmp_path / "ad", steps=1, seq_len=32, batch_size=2, progress=False)
    assert not (tmp_path / "ad").exists()


def test_dry_run_checks_the_checkpoint_it_would_resume(tmp_path, data_dir):
    """--resume under --dry-run: the checkpoint is verified and its model compared, as the run does,
    without loading it; a model folder named as the checkpoint is refused the same way."""
    from ratplus.train.checkpoint import CheckpointError
    from ratplus.train.trainer import plan_only

    out = train(_cfg(tmp_path, data_dir, steps=2, eval_interval=0))
    other = _cfg(tmp_path, data_dir, steps=4, resume=True, model_overrides={"ffn_mult": 2})
    errors = []
    for run in (plan_only, train):
        with pytest.raises(ValueError, match="is for another model configuration than this run") as e:
            run(other)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    plan_only(_cfg(tmp_path, data_dir, steps=4, resume=True))  # the same model: fits
    with pytest.raises(CheckpointError, match="is a model folder, not a training checkpoint"):
        plan_only(_cfg(tmp_path, data_dir, steps=4, resume=str(out)))

import json
import random

import numpy as np
import pytest
import torch

from ratplus import ModelConfig, RATPlusLM
from ratplus.io.folder import load_metadata, load_pretrained
from ratplus.io.manifest import MANIFEST_FILE
from ratplus.train import checkpoint as C
from ratplus.train.distributed import full_model_state, full_optimizer_state, load_full_state


def _trained(seed=0):
    torch.manual_seed(seed)
    model = RATPlusLM(ModelConfig.from_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (2, 16))
    model(ids, labels=ids.roll(-1, 1)).loss.backward()
    opt.step()
    return model, opt


def _save(root, step, model, opt, tokenizer=None):
    rng_js, rng_t = C.rng_state()
    return C.save_checkpoint(
        root,
        step,
        model.config,
        full_model_state(model),
        full_optimizer_state(model, opt),
        {"tokens_seen": 7 * step, "rng": rng_js},
        rng_t,
        {"seq_len": 16},
        tokenizer=tokenizer,
        metadata={"tokens_seen": 7 * step},
    )


def test_roundtrip_restores_model_optimizer_and_rng(tmp_path, tokenizer):
    model, opt = _trained()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = _save(tmp_path, 3, model, opt, tokenizer)
    want = (random.random(), np.random.rand(), torch.rand(1))
    assert path.name == "step_0000003"
    assert {p.name for p in path.iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metadata.json",
        "trainer_state.json",
        "trainer_state.safetensors",
        "train_config.json",
        "manifest.json",
    }
    ck = C.load_checkpoint(path)
    assert ck.step == 3 and ck.trainer_state["tokens_seen"] == 21 and ck.train_config == {"seq_len": 16}
    # a fresh model + optimizer loaded from the checkpoint equals the original, moments included
    fresh, fresh_opt = _trained(seed=1)
    load_full_state(fresh, ck.model_state, fresh_opt, ck.optimizer_state)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    for i in sa:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[i][key], sb[i][key])
    C.set_rng_state(ck.trainer_state["rng"], ck.tensors)
    assert (random.random(), np.random.rand()) == want[:2] and torch.equal(torch.rand(1), want[2])
    # the checkpoint is also a plain model folder
    loaded = load_pretrained(path)
    assert torch.equal(loaded.embedding.wte.weight, model.embedding.wte.weight)
    assert load_metadata(path) == {"tokens_seen": 21}


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_checkpoint_is_refused(tmp_path, damage):
    model, opt = _trained()
    path = _save(tmp_path, 1, model, opt)
    target = path / ("trainer_state.safetensors" if damage != "flip" else "model.safetensors")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
        match = "truncated"
    elif damage == "flip":
        target.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
        match = "does not match its SHA-256"
    elif damage == "delete":
        target.unlink()
        match = "file missing"
    else:
        (path / MANIFEST_FILE).unlink()
        match = "incomplete or not a ratplus checkpoint"
    with pytest.raises(C.CheckpointError, match=match):
        C.load_checkpoint(path)
    # the only checkpoint is damaged: resuming refuses instead of starting from scratch
    with pytest.raises(C.CheckpointError, match=r"every checkpoint .* is damaged.*step_0000001"):
        C.latest_checkpoint(tmp_path)


def test_latest_skips_damaged_and_prune_keeps_last(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt)
    (tmp_path / "step_0000004" / "model.safetensors").write_bytes(b"oops")
    assert C.latest_checkpoint(tmp_path).name == "step_0000003"
    C.prune_checkpoints(tmp_path, keep_last=2)
    # by validity, then step: the damaged newest goes first, the two newest good ones stay
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [2, 3]


def test_crash_mid_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    """A write that dies before the manifest and the rename leaves only a hidden temp folder,
    which resume ignores and the next run removes."""
    model, opt = _trained()
    _save(tmp_path, 1, model, opt)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(C, "write_manifest", die)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, opt)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers and all(".tmp-" in n for n in leftovers)
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [1]
    assert C.latest_checkpoint(tmp_path).name == "step_0000001"
    C.remove_leftovers(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwriting_a_step_replaces_it_whole(tmp_path):
    model, opt = _trained()
    _save(tmp_path, 1, model, opt)
    other, other_opt = _trained(seed=3)
    path = _save(tmp_path, 1, other, other_opt)
    C.verify_folder(path)
    assert torch.equal(load_pretrained(path).embedding.wte.weight, other.embedding.wte.weight)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {MANIFEST_FILE}


def test_resume_over_only_damaged_checkpoints_stops_with_the_list(tmp_path, data_dir, capsys):
    from ratplus.cli import main

    out = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--eval-batches", "1"]
    argv += ["--data", str(data_dir), "--out", str(out), "--ckpt-interval", "1"]
    assert main([*argv, "--steps", "2"]) == 0
    for _, path in C.list_checkpoints(out / "checkpoints"):
        w = path / "model.safetensors"
        data = w.read_bytes()
        w.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert main([*argv, "--steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "every checkpoint" in err and "step_0000001" in err and "step_0000002" in err
    assert [s for s, _ in C.list_checkpoints(out / "checkpoints")] == [1, 2]  # nothing overwritten


def test_recursive_leftover_sweep_keeps_live_writers_and_results(tmp_path):
    """The demo's sweep of its own tree: temporary folders of dead processes go, at any depth and
    under either naming; a live writer's temporary folder and every finished result stay."""
    import os

    from ratplus.train.checkpoint import remove_leftovers

    dead = 2**22 + 12345  # above any pid this machine hands out (pid_max <= 2**22)
    live = os.getppid()
    keep = [tmp_path / "work" / "stage" / "final", tmp_path / "data" / "train", tmp_path / "work" / f".x.tmp-{live}"]
    gone = [
        tmp_path / "work" / "stage" / "checkpoints" / f".step_0000003.tmp-{dead}",
        tmp_path / "data" / f"train.tmp-{dead}",
        tmp_path / f".report.old-{dead}",
    ]
    for p in keep + gone:
        p.mkdir(parents=True)
    remove_leftovers(tmp_path)  # not recursive: only the hidden ones at the top
    assert not gone[2].exists() and gone[0].exists() and gone[1].exists()
    remove_leftovers(tmp_path, recursive=True)
    assert not any(p.exists() for p in gone) and all(p.exists() for p in keep)

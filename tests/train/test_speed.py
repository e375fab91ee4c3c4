"""Activation checkpointing and the compiled training step, through the trainer: the same losses and
weights as the plain eager run (joint step, FSDP2), checkpoints with the eager names, resume across
compiled and eager."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ratplus.config import ModelConfig
from ratplus.io.folder import load_pretrained
from ratplus.model.rat import RATPlusLM
from ratplus.train.config import TrainConfig
from ratplus.train.trainer import strip_compile_prefix, train

ROOT = Path(__file__).resolve().parents[2]


def _cfg(out: Path, data_dir: Path, **kw) -> TrainConfig:
    base = dict(model="tiny", seq_len=32, batch_size=4, sparse_pattern="D4-W0-P0", progress=False, steps=3)
    base.update(out_dir=str(out), data=str(data_dir), ckpt_interval=1, eval_interval=3, eval_batches=1, keep_last=3)
    return TrainConfig(**{**base, **kw})


def _losses(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: {**r.get("losses", {}), **{"val/" + k: v for k, v in r.get("val_loss", {}).items()}}
            for r in records}  # fmt: skip


def _assert_same_run(a: Path, b: Path, rel: float) -> None:
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys() and la
    for step in la:
        assert la[step].keys() == lb[step].keys()
        for k in la[step]:
            assert lb[step][k] == pytest.approx(la[step][k], rel=rel), (step, k)
    ma, mb = load_pretrained(a / "final"), load_pretrained(b / "final")
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=rel, atol=1e-6, msg=name)


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_joint_training_run(tmp_path, data_dir, every):
    plain = train(_cfg(tmp_path / "plain", data_dir)).parent
    ckpt = train(_cfg(tmp_path / "ckpt", data_dir, activation_checkpointing=every)).parent
    _assert_same_run(plain, ckpt, rel=1e-6)
    resolved = json.loads((ckpt / "train_config.json").read_text())
    assert resolved["activation_checkpointing"] == every


def test_checkpointing_setting_is_validated(tmp_path, data_dir):
    for bad in (-1, True, "all"):
        with pytest.raises(ValueError, match="activation_checkpointing must be an int >= 0"):
            train(_cfg(tmp_path / "x", data_dir, activation_checkpointing=bad))
    with pytest.raises(ValueError, match="compile must be true or false"):
        train(_cfg(tmp_path / "x", data_dir, compile="yes"))


def test_compiled_names_are_stripped_to_the_eager_ones():
    model = RATPlusLM(ModelConfig.from_preset("tiny"))
    compiled = torch.compile(model)  # wrapping alone adds the prefix; nothing is compiled until called
    keys = list(compiled.state_dict())
    assert all(k.startswith("_orig_mod.") for k in keys)
    assert list(strip_compile_prefix(compiled.state_dict())) == list(model.state_dict())
    nested = {"module._orig_mod.backbone.ln.weight": 1}
    assert strip_compile_prefix(nested) == {"module.backbone.ln.weight": 1}


@pytest.mark.slow
def test_fsdp_two_processes_with_checkpointing_match_one_plain_process(tmp_path, data_dir):
    """FSDP2 wraps each block; checkpointing recomputes the wrapped block (its parameters gathered again)."""
    one = train(_cfg(tmp_path / "one", data_dir, ckpt_interval=3)).parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ratplus"]
    cmd += ["train", "--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--sparse-pattern", "D4"]
    cmd += ["--steps", "3", "--ckpt-interval", "3", "--eval-interval", "3", "--eval-batches", "1", "--no-progress"]
    cmd += ["--data", str(data_dir), "--out", str(tmp_path / "two"), "--distributed", "fsdp"]
    cmd += ["--activation-checkpointing", "all"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(one, tmp_path / "two", rel=1e-5)


@pytest.mark.slow
def test_compiled_run_matches_eager_and_resumes_eager(tmp_path, data_dir):
    """Compiling costs minutes on a busy CPU: one compiled run (two graphs, sparse and dense)."""
    eager = train(_cfg(tmp_path / "eager", data_dir)).parent
    compiled = train(_cfg(tmp_path / "compiled", data_dir, compile=True)).parent
    _assert_same_run(eager, compiled, rel=1e-4)
    # the compiled run's checkpoints carry the eager names, tensor for tensor
    for step in ("step_0000001", "step_0000003"):
        a, b = (root / "checkpoints" / step for root in (eager, compiled))
        for name in ("model.safetensors", "trainer_state.safetensors"):
            with safe_open(a / name, "pt") as fa, safe_open(b / name, "pt") as fb:
                assert sorted(fa.keys()) == sorted(fb.keys())
                assert not any("_orig_mod" in k for k in fb.keys())  # noqa: SIM118 (safe_open is not a dict)
    # a compiled run's checkpoint resumes in an eager run, to the same end
    mixed = tmp_path / "mixed"
    shutil.copytree(compiled, mixed)
    shutil.rmtree(mixed / "final")
    for step in ("step_0000002", "step_0000003"):
        shutil.rmtree(mixed / "checkpoints" / step)
    train(_cfg(mixed, data_dir, resume=True))
    _assert_same_run(eager, mixed, rel=1e-4)

"""Training in other processes: SIGKILL at any moment, then resume; torchrun with 2 processes (gloo)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ratplus.io.folder import load_pretrained
from ratplus.train.checkpoint import list_checkpoints, verify_folder
from ratplus.train.config import TrainConfig
from ratplus.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]  # `python -m ratplus` from here imports this tree
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ARGS = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--sparse-pattern", "D4", "--no-progress"]


def _losses(out: Path, key: str = "losses") -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def _kill_and_resume(tmp_path: Path, data_dir: Path, kills: int, steps: int) -> Path:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ratplus", "train", *ARGS, "--data", str(data_dir), "--out", str(out)]
    cmd += ["--steps", str(steps), "--ckpt-interval", "1", "--eval-interval", "0", "--keep-last", "2", "--resume"]
    rng = random.Random(0)
    for k in range(kills):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start_steps = {s for s, _ in list_checkpoints(out / "checkpoints")}
        deadline = time.monotonic() + 120
        # wait until this run has published a new checkpoint, then kill at a random moment after it
        while not ({s for s, _ in list_checkpoints(out / "checkpoints")} - start_steps):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before the kill: make it longer"
        proc.stderr.close()
        published = list_checkpoints(out / "checkpoints")
        assert published, f"kill {k}: no checkpoint left"
        for _, path in published:
            verify_folder(path)  # every published checkpoint is whole, whatever the kill interrupted
        assert not (out / "final").exists()
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def test_sigkill_then_resume_loses_nothing_but_unsaved_steps(tmp_path, data_dir):
    out = _kill_and_resume(tmp_path, data_dir, kills=1, steps=16)
    assert sorted(_losses(out)) == list(range(1, 17))  # each step logged once, in order
    # and the result equals a run that was never killed
    clean = train(TrainConfig(**_cfg_kw(tmp_path / "clean", data_dir, steps=16)))
    assert _losses(clean.parent) == _losses(out)
    assert (clean / "model.safetensors").read_bytes() == (out / "final" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_repeated_sigkills(tmp_path, data_dir):
    out = _kill_and_resume(tmp_path, data_dir, kills=5, steps=60)
    assert sorted(_losses(out)) == list(range(1, 61))


def _cfg_kw(out: Path, data_dir: Path, **kw) -> dict:
    base = dict(model="tiny", seq_len=32, batch_size=4, sparse_pattern="D4-W0-P0", progress=False)
    base.update(out_dir=str(out), data=str(data_dir), ckpt_interval=1, eval_interval=0, keep_last=2)
    return {**base, **kw}


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_torchrun_two_processes_match_one_and_share_checkpoints(tmp_path, data_dir, mode):
    kw = dict(steps=3, grad_accum=2, ckpt_interval=2, eval_interval=3, eval_batches=2, keep_last=3)
    one = train(TrainConfig(**_cfg_kw(tmp_path / "one", data_dir, **kw)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "ratplus", "train", *ARGS, "--data", str(data_dir), "--out", str(tmp_path / "two")]
    cmd += ["--distributed", mode, "--steps", "3", "--grad-accum", "2", "--ckpt-interval", "2"]
    cmd += ["--eval-interval", "3", "--eval-batches", "2", "--keep-last", "3"]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(str(tmp_path / "two" / "final")) == 1  # printed by rank 0 only
    two = tmp_path / "two" / "final"

    # same losses as one process (global batches, global normalisation), up to float summation order
    la, lb = _losses(one.parent), _losses(two.parent)
    assert la.keys() == lb.keys() == {1, 2, 3}
    for step in la:
        for pattern in la[step]:
            assert lb[step][pattern] == pytest.approx(la[step][pattern], rel=1e-5)
    va, vb = _losses(one.parent, "val_loss"), _losses(two.parent, "val_loss")  # eval split over processes
    assert va.keys() == vb.keys() == {3} and set(va[3]) == {"D4-W0-P0", "dense"}
    for pattern in va[3]:
        assert vb[3][pattern] == pytest.approx(va[3][pattern], rel=1e-5)
    # same checkpoint format: files, tensor names, shapes, dtypes, data position
    for a, b in [(one.parent / "checkpoints" / "step_0000002", tmp_path / "two" / "checkpoints" / "step_0000002")]:
        verify_folder(b)
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for name in ("model.safetensors", "trainer_state.safetensors"):
            with safe_open(a / name, "pt") as fa, safe_open(b / name, "pt") as fb:
                assert sorted(fa.keys()) == sorted(fb.keys())
                for key in fa.keys():  # noqa: SIM118 (safe_open is not a dict)
                    ta, tb = fa.get_tensor(key), fb.get_tensor(key)
                    assert ta.shape == tb.shape and ta.dtype == tb.dtype, key
                    if key.startswith(("optim/", "backbone", "embedding")):
                        torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-6, msg=key)
        sa, sb = (json.loads((p / "trainer_state.json").read_text()) for p in (a, b))
        assert sa["data"] == sb["data"] and sa["tokens_seen"] == sb["tokens_seen"]
    ma, mb = load_pretrained(one), load_pretrained(two)
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=name)

    # a checkpoint written by 2 processes resumes in 1
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "two", mixed)
    shutil.rmtree(mixed / "final")
    shutil.rmtree(mixed / "checkpoints" / "step_0000003")
    resumed = train(TrainConfig(**_cfg_kw(mixed, data_dir, resume=True, **kw)))
    assert _losses(mixed)[3] == pytest.approx(la[3], rel=1e-5)
    torch.testing.assert_close(
        load_pretrained(resumed).embedding.wte.weight, ma.embedding.wte.weight, rtol=1e-4, atol=1e-6
    )

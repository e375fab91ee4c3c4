"""One writer per output folder (ratplus.io.lock) and start-up cleanup that spares live writers."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from ratplus import ModelConfig, RATPlusLM
from ratplus.cli import main
from ratplus.io.folder import save_pretrained
from ratplus.io.lock import LOCK_FILE, LockError, folder_lock
from ratplus.train import checkpoint as C
from ratplus.train.config import TrainConfig
from ratplus.train.trainer import train

TRAIN = ["--model", "tiny", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--eval-batches", "1"]


@pytest.fixture
def live_pid():
    """A process that is alive for the duration of the test (stands in for another run)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock(folder, pid, host=None, command="train"):
    folder.mkdir(parents=True, exist_ok=True)
    owner = {"pid": pid, "host": host or socket.gethostname(), "command": command}
    (folder / LOCK_FILE).write_text(json.dumps(owner))


def test_a_second_writer_fails_at_once_naming_the_owner(tmp_path, live_pid, data_dir, capsys):
    out = tmp_path / "run"
    _lock(out, live_pid)
    argv = ["train", *TRAIN, "--data", str(data_dir), "--out", str(out), "--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ratplus train: error:") and f"pid {live_pid}" in err and "in use by another run" in err
    assert not (out / "checkpoints").exists() and (out / LOCK_FILE).exists()  # the owner's lock is left alone
    save_pretrained(RATPlusLM(ModelConfig.from_preset("tiny")), tmp_path / "m")
    for argv in (
        ["adapt", "--ckpt", str(tmp_path / "m"), "--pattern", "D4", "--steps", "1", "--out", str(out)],
        ["demo", "--out", str(out), "--quick", "--no-progress"],
    ):
        assert main([*argv, "--data", str(data_dir)] if argv[0] == "adapt" else argv) == 2
        assert "in use by another run" in capsys.readouterr().err, argv


def test_same_process_cannot_take_its_own_lock_twice(tmp_path):
    with folder_lock(tmp_path, "train"), pytest.raises(LockError, match="already locked by this process"):
        folder_lock(tmp_path, "demo").__enter__()
    assert not (tmp_path / LOCK_FILE).exists()  # released on exit


def test_lock_from_another_host_is_never_taken_over(tmp_path, dead_pid):
    _lock(tmp_path, dead_pid, host="some-other-host")
    with pytest.raises(LockError, match="some-other-host"):
        folder_lock(tmp_path, "train").__enter__()


@pytest.mark.parametrize("stale", ["dead", "garbled"])
def test_stale_lock_is_taken_over_with_a_warning(tmp_path, dead_pid, data_dir, caplog, stale):
    out = tmp_path / "run"
    if stale == "dead":
        _lock(out, dead_pid)
    else:
        out.mkdir()
        (out / LOCK_FILE).write_text("")  # a kill between create and write of an old lock
    cfg = TrainConfig(model="tiny", data=str(data_dir), out_dir=str(out), seq_len=32, batch_size=2, steps=1)
    with caplog.at_level(logging.WARNING, logger="ratplus"):
        final = train(TrainConfig(**{**cfg.to_dict(), "progress": False, "eval_batches": 1}))
    assert final.is_dir()
    assert any("taking over the stale lock" in r.getMessage() for r in caplog.records)
    assert not (out / LOCK_FILE).exists()


def test_cleanup_removes_only_own_and_dead_leftovers(tmp_path, live_pid, dead_pid):
    names = [f".step_0000002.tmp-{live_pid}", f".step_0000003.tmp-{dead_pid}", f".step_0000001.old-{os.getpid()}"]
    for n in names:
        (tmp_path / n).mkdir()
        (tmp_path / n / "model.safetensors").write_bytes(b"x")
    C.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [names[0]]  # the live writer's folder stays


@pytest.mark.slow
def test_two_real_runs_on_one_folder(tmp_path, data_dir):
    """A real second `ratplus train` while the first one runs fails at once; the first finishes."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "ratplus", "train", *TRAIN, "--data", str(data_dir), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*argv, "--steps", "400", "--ckpt-interval", "0"], env=env, stderr=subprocess.PIPE)
    try:
        for _ in range(600):  # the lock appears once the first run has started
            if (out / LOCK_FILE).exists():
                break
            first.poll()
            assert first.returncode is None
            time.sleep(0.1)
        second = subprocess.run([*argv, "--steps", "1"], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "in use by another run" in second.stderr
    finally:
        first.kill()
        first.wait()

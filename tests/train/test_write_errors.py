"""Disk full and other write failures: a clear error naming the path and the space needed, the
writer's own partial files removed, earlier results intact, and a rerun that works as is."""

import errno
import os
import shutil
import subprocess

import pytest

from ratplus.cli import main
from ratplus.io.lock import LOCK_FILE
from ratplus.runtime import WriteError, atomic_write_bytes, write_jsonl, writing
from ratplus.train import checkpoint as C

TRAIN = ["--model", "tiny", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--eval-batches", "1"]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _hidden(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*") if p.name != LOCK_FILE)


def test_atomic_write_keeps_the_old_file_and_names_the_space(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")
    monkeypatch.setattr(os, "fsync", _disk_full)
    want = r"cannot write .*results\.json: No space left on device; .* free on that disk, about 5\.0 KiB needed"
    with pytest.raises(WriteError, match=want):
        atomic_write_bytes(target, b"x" * 5120)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_writing_turns_any_oserror_into_one_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(WriteError, match=r"cannot write .*out\.jsonl"), writing(tmp_path / "out.jsonl"):
        (tmp_path / "f" / "out.jsonl").write_text("x")  # a file where a folder should be
    with pytest.raises(ValueError, match="is a file; a folder is expected"):
        write_jsonl(tmp_path / "f" / "out.jsonl", [{"a": 1}])


def test_train_disk_full_keeps_checkpoints_and_resumes(tmp_path, data_dir, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["train", *TRAIN, "--data", str(data_dir), "--out", str(out), "--ckpt-interval", "1", "--keep-last", "5"]
    assert main([*argv, "--steps", "2"]) == 0
    monkeypatch.setattr(os, "fsync", _disk_full)
    assert main([*argv, "--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ratplus train: error: cannot write") and "No space left" in err and "needed" in err
    assert [s for s, _ in C.list_checkpoints(out / "checkpoints")] == [1, 2]
    for _, path in C.list_checkpoints(out / "checkpoints"):
        C.verify_folder(path)
    assert _hidden(out) == [] and not (out / LOCK_FILE).exists()
    monkeypatch.undo()  # space freed: the same command resumes, no --overwrite, no cleanup
    assert main([*argv, "--steps", "4", "--resume"]) == 0
    assert [s for s, _ in C.list_checkpoints(out / "checkpoints")] == [1, 2, 3, 4]


def test_data_prepare_disk_full_leaves_nothing_that_blocks_a_retry(tmp_path, monkeypatch, docs, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, d in enumerate(docs):
        (corpus / f"d{i}.txt").write_text(d)
    out = tmp_path / "data"
    argv = ["data", "prepare", "--input", str(corpus), "--out", str(out), "--vocab-size", "300"]
    calls = []

    def full_on_val(fd):  # the train split is written, the val split hits a full disk
        calls.append(fd)
        if len(calls) > 1:
            _disk_full()

    monkeypatch.setattr(os, "fsync", full_on_val)
    assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []
    monkeypatch.undo()
    assert main(argv) == 0 and (out / "train" / "meta.json").is_file() and (out / "val" / "meta.json").is_file()


@pytest.mark.slow
def test_real_full_disk_on_a_small_tmpfs(tmp_path, data_dir, capsys):
    """Training into a 1.5 MiB tmpfs fills it: clean error, good checkpoints kept, retry after growing it."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        out = mnt / "run"
        argv = ["train", *TRAIN, "--data", str(data_dir), "--out", str(out), "--ckpt-interval", "1", "--keep-last", "9"]
        assert main([*argv, "--steps", "8"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "No space left on device" in err and "free on that disk" in err
        saved = [s for s, _ in C.list_checkpoints(out / "checkpoints")]
        assert saved and saved == list(range(1, len(saved) + 1))
        for _, path in C.list_checkpoints(out / "checkpoints"):
            C.verify_folder(path)
        assert _hidden(out) == []
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        assert main([*argv, "--steps", "8", "--resume"]) == 0
        assert (out / "final" / "model.safetensors").is_file()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)

import json

import pytest

from ratplus.cli import main
from ratplus.io.folder import load_metadata, load_pretrained
from ratplus.train.data import TokenDataset

TRAIN = ["--model", "tiny", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--eval-batches", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("corpus")
    for i, d in enumerate(docs):
        (root / f"doc{i}.txt").write_text(d)
    return root


def test_data_prepare_train_adapt_sft(tmp_path, corpus, capsys):
    data = tmp_path / "data"
    assert main(["data", "prepare", "--input", str(corpus), "--out", str(data), "--vocab-size", "300"]) == 0
    out = capsys.readouterr().out
    assert "train: 7 documents" in out.replace(str(data) + "/", "") and "EOS id 0" in out
    assert TokenDataset(data / "val").meta["num_documents"] == 1  # 5% of 8 documents, at least one

    run = tmp_path / "run"
    argv = ["train", *TRAIN, "--data", str(data), "--out", str(run), "--steps", "2", "--set", "max_seq_len=64"]
    assert main(argv) == 0
    final = run / "final"
    assert capsys.readouterr().out.strip().endswith(str(final))
    assert load_pretrained(final).config.max_seq_len == 64
    resolved = json.loads((run / "train_config.json").read_text())
    assert resolved["model_overrides"] == {"max_seq_len": 64} and resolved["sparse_pattern"] == "D64-W0-P0"

    adapted = tmp_path / "adapted"
    argv = ["adapt", "--ckpt", str(final), "--pattern", "D4-W8-P2", "--steps", "1", "--out", str(adapted)]
    assert main([*argv, "--seq-len", "32", "--batch-size", "2", "--no-progress"]) == 0
    assert load_metadata(adapted / "final")["adapted_pattern"] == "D4-W8-P2"

    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text("".join(json.dumps({"prompt": f"Say {w}: ", "answer": w}) + "\n" for w in ("yes", "no")))
    argv = ["sft", "--ckpt", str(adapted / "final"), "--data", str(sft_file), "--steps", "1", "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "sft"), "--no-progress"]) == 0
    meta = load_metadata(tmp_path / "sft" / "final")
    assert meta["task"] == "sft" and meta["train_pattern"] == "D4-W8-P2"  # trained in the adapted pattern


def test_train_from_a_config_file_with_flag_override(tmp_path, data_dir):
    cfg = {"model": "tiny", "data": str(data_dir), "seq_len": 32, "batch_size": 2, "steps": 5, "progress": False}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    argv = ["train", "--config", str(tmp_path / "cfg.json"), "--steps", "1", "--out", str(tmp_path / "r")]
    assert main([*argv, "--no-joint-train", "--train-pattern", "D4"]) == 0
    resolved = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert resolved["steps"] == 1 and resolved["step_patterns"] == ["D4-W0-P0"]
    argv = ["train", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "w"), "--dense-warmup", "0.4"]
    assert main([*argv, "--sparse-pattern", "D4"]) == 0
    resolved = json.loads((tmp_path / "w" / "train_config.json").read_text())
    assert resolved["dense_warmup"] == 0.4 and resolved["dense_warmup_steps"] == 2


def test_data_prepare_bundled_corpus_by_name(tmp_path, capsys, monkeypatch):
    from ratplus.io import corpus

    fake = {"train": ["alpha beta gamma " * 40] * 3, "val": ["delta epsilon " * 40]}
    monkeypatch.setattr(corpus, "wikipedia_documents", lambda split: fake[split])
    out = tmp_path / "wiki"
    assert main(["data", "prepare", "--bundled", "wikipedia", "--out", str(out), "--vocab-size", "300"]) == 0
    assert (
        TokenDataset(out / "train").meta["num_documents"] == 3 and TokenDataset(out / "val").meta["num_documents"] == 1
    )
    assert main(["data", "prepare", "--bundled", "gutenberg", "--out", str(tmp_path / "x")]) == 2
    assert "unknown bundled corpus 'gutenberg'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["train", *TRAIN, "--steps", "1", "--sparse-pattern", "D0"], "dilation_size must be >= 1"),
        (["train", *TRAIN, "--steps", "1", "--seq-len", "1000"], "above the model's max_seq_len=256"),
        (["train", *TRAIN, "--steps", "1", "--train-pattern", "W16", "--no-joint-train"], "unknown attention pattern"),
        (["train", *TRAIN, "--steps", "1", "--data", "/no/such/dir"], "data folder not found"),
        (["train", *TRAIN, "--steps", "1", "--dense-warmup", "1"], "dense_warmup is a fraction of the steps"),
        (["adapt", "--ckpt", "/no/such/model", "--pattern", "D16", "--steps", "1"], "not found"),
    ],
)
def test_cli_errors_are_clear(tmp_path, data_dir, capsys, argv, match):
    if "--data" not in argv and argv[0] == "train":
        argv += ["--data", str(data_dir)]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith(f"ratplus {argv[0]}: error:")
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_data_prepare_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("\n \n")
    assert main(["data", "prepare", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "is empty" in capsys.readouterr().err
    (tmp_path / "bin.txt").write_bytes(b"\x00\xff\x00binary")
    assert main(["data", "prepare", "--input", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a text file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

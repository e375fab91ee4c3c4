"""Every bad input on the command line ends as one line `ratplus <command>: error: ...` naming the
input (flag, field or file), exit code 2, no traceback, and before any work starts."""

import json

import pytest
import torch

from ratplus import ModelConfig, RATPlusLM
from ratplus.cli import main
from ratplus.io.folder import save_pretrained


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    save_pretrained(RATPlusLM(ModelConfig.from_preset("tiny")), root / "model")
    (root / "afile").write_text("x")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "bad.json").write_text("{oops")
    (root / "list.json").write_text("[1, 2]")
    (root / "text.txt").write_text("To be, or not to be, that is the question. " * 20)
    (root / "sft.jsonl").write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    (root / "runfolder" / "final").mkdir(parents=True)  # a training run: its model is final/
    (root / "runfolder" / "final" / "config.json").write_text((root / "model" / "config.json").read_text())
    (root / "running" / "checkpoints").mkdir(parents=True)  # a run without a final model yet
    (root / "hfdir").mkdir()
    (root / "hfdir" / "config.json").write_text(json.dumps({"model_type": "ratplus", "architectures": ["X"]}))
    return root


T = ["train", "--model", "tiny", "--data", "{root}/nodata", "--out", "{root}/run", "--steps", "1", "--no-progress"]
G = ["generate", "--ckpt", "{root}/model", "--max-new-tokens", "2"]
P = ["eval", "ppl", "--ckpt", "{root}/model", "--data", "{root}/text.txt", "--out", "{root}/ev", "--no-plot", "--quiet"]
D = ["data", "prepare", "--input", "{root}/text.txt", "--out", "{root}/d", "--vocab-size", "300"]

# nan, inf, out-of-range and empty values of number and list flags are refused by argparse itself
# (ratplus.cli.common.number): tests/cli/test_number_flags.py
CASES = [
    # numbers: NaN / inf / out of range, checked before any data is read
    ([*T, "--set", "rope_base=nan"], "train", "rope_base must be a finite number"),
    ([*T, "--set", "norm_eps=0"], "train", "norm_eps must be a finite number > 0"),
    ([*T, "--set", "init_std=-1"], "train", "init_std must be a finite number >= 0"),
    ([*T, "--set", 'd_model="abc"'], "train", "d_model must be a positive int"),
    ([*T, "--set", "tie_embeddings=3"], "train", "tie_embeddings must be true or false"),
    ([*T, "--set", "bogus=1"], "train", "unknown ModelConfig field(s): bogus"),
    ([*T, "--seq-len", "64", "--set", "vocab_size=10000000000"], "train", "the memory plan needs about"),  # cannot fit
    # patterns: non-ASCII digits, conflicting suffixes, empty, beyond any context
    ([*T, "--sparse-pattern", "D١٦"], "train", "unknown attention pattern 'D١٦'"),
    ([*T, "--sparse-pattern", "topk-B4-K2-quest-moba"], "train", "conflicting scorings quest and moba"),
    ([*T, "--sparse-pattern", ""], "train", "sparse_pattern must be a non-empty pattern string"),
    ([*T, "--sparse-pattern", "D" + "9" * 30], "train", "is beyond any context"),
    # files and folders
    (["train", "--model", "tiny", "--out", "{root}/afile", "--steps", "1"], "train", "afile is a file"),
    (["train", "--config", "{root}/bad.json", "--out", "{root}/r"], "train", "bad.json is not valid JSON"),
    (["train", "--config", "{root}/binary.bin", "--out", "{root}/r"], "train", "binary.bin is not a text"),
    (["train", "--config", "{root}/list.json", "--out", "{root}/r"], "train", "must be a JSON object"),
    ([*T, "--device", "bogus"], "train", "unknown device 'bogus' (--device)"),
    ([*D, "--vocab-size", "10000000000"], "data prepare", "vocab_size must be an int in [257, 1048576]"),
    (["data", "prepare", "--input", "{root}/text.txt", "--out", "{root}/afile"], "data prepare", "afile is a file"),
    ([*D[:2], "--input", "{root}/binary.bin", "--out", "{root}/d2"], "data prepare", "binary.bin"),
    # generate: ids, sampling numbers, device
    ([*G, "--prompt-ids", "1,999"], "generate", "--prompt-ids: token id 999 is outside [0, vocab_size=256)"),
    ([*G, "--prompt-ids", "1", "--stop", "300"], "generate", "--stop: token id 300"),
    ([*G, "--prompt-ids", "1", "--device", "bogus"], "generate", "unknown device 'bogus'"),
    ([*G, "--prompt-ids", "1", "--pattern", "D4-W1-quest"], "generate", "unknown field 'quest'"),
    (["generate", "--ckpt", "{root}/afile", "--prompt-ids", "1"], "generate", "afile is a file"),
    # eval: budgets and limits
    (
        ["eval", "ppl", "--ckpt", "{root}/model", "--data", "{root}/text.txt", "--out", "{root}/afile"],
        "eval ppl",
        "afile is a file",
    ),
    (
        ["eval", "budget", "--ckpt", "{root}/model", "--data", "{root}/text.txt", "--out", "{root}/afile"],
        "eval budget",
        "afile is a file",
    ),
    (["eval", "recall", "--quick", "--out", "{root}/afile"], "eval recall", "afile is a file"),
    ([*G, "--prompt-ids", "1", "--pattern", ""], "generate", "unknown attention pattern ''"),
    # a folder that is not a native model folder says what it is and how to get one
    (["generate", "--ckpt", "{root}/hfdir", "--prompt-ids", "1"], "generate", "is a Hugging Face folder"),
    ([*P[:2], "--ckpt", "{root}/hfdir", *P[4:]], "eval ppl", "convert it: ratplus convert"),
    (
        ["tune-pattern", "--ckpt", "{root}/hfdir", "--data", "{root}/text.txt", "--kv-budget", "0.5"],
        "tune-pattern",
        "is a Hugging Face folder",
    ),
    (["generate", "--ckpt", "{root}/runfolder", "--prompt-ids", "1"], "generate", "its trained model is"),
    ([*P[:2], "--ckpt", "{root}/running", *P[4:]], "eval ppl", "training run folder without a final model"),
    (
        ["adapt", "--ckpt", "{root}/model", "--pattern", "D4", "--steps", "1", "--batch-size", "100000", "--dry-run"],
        "adapt",
        "the memory plan needs about",
    ),
    # inference-only patterns refused wherever a model is trained (they would silently train dense)
    ([*T, "--sparse-pattern", "snapkv-C16-O4"], "train", "is inference-only (SnapKV)"),
    ([*T, "--sparse-pattern", "topk-B16-K2"], "train", "is inference-only (top-k blocks)"),
    (
        ["adapt", "--ckpt", "{root}/model", "--pattern", "snapkv-C16-O4", "--steps", "1"],
        "adapt",
        "pattern (--pattern) 'snapkv-C16-O4' is inference-only",
    ),
    (
        ["adapt", "--ckpt", "{root}/model", "--pattern", "topk-B8-K2", "--steps", "1"],
        "adapt",
        "is inference-only (top-k blocks)",
    ),
    (
        ["sft", "--ckpt", "{root}/model", "--data", "{root}/sft.jsonl", "--pattern", "snapkv-C16-O4"],
        "sft",
        "is inference-only (SnapKV)",
    ),
    (["demo", "--out", "{root}/dm", "--joint-pattern", "topk-B8-K2"], "demo", "--joint-pattern 'topk-B8-K2-W0"),
    ([*T, "--lr", "1e30"], "train", "lr must be a finite number in (0, 1], got 1e+30 (AdamW moves"),
    # the recall probe: learning rates, patterns, threads and sizes checked before any training
    (["eval", "recall", "--quick", "--out", "{root}/rq", "--lr", "1e30"], "eval recall", "(AdamW moves"),
    (
        ["eval", "recall", "--quick", "--out", "{root}/rq", "--adapt-lr-mult", "1e6"],
        "eval recall",
        "the adaptation LR (lr x adapt_lr_mult) must be a finite number in (0, 1]",
    ),
    (
        ["eval", "recall", "--quick", "--out", "{root}/rq", "--joint-pattern", "topk-B4-K2"],
        "eval recall",
        "joint_pattern (--joint-pattern) 'topk-B4-K2-W0-P0-quest' is inference-only",
    ),
    (
        ["eval", "recall", "--quick", "--out", "{root}/rq", "--adapt-patterns", "snapkv-C8-O4"],
        "eval recall",
        "is inference-only (SnapKV)",
    ),
    (
        ["eval", "recall", "--quick", "--out", "{root}/rq", "--patterns", "dense,D4", "--adapt-patterns", "D8"],
        "eval recall",
        "D8 is not among the evaluated patterns (dense, D4); add it to --patterns",
    ),
    (
        ["eval", "recall", "--quick", "--out", "{root}/rq", "--patterns", "dense,D100"],
        "eval recall",
        "D100 has dilation 100 >= seq_len=48",
    ),
    (["eval", "recall", "--quick", "--out", "{root}/rq", "--value-vocab", "100000000"], "eval recall", "GiB avail"),
    (["eval", "recall", "--quick", "--out", "{root}/rq", "--seq-len", "1000000000"], "eval recall", "GiB avail"),
    (["eval", "recall", "--quick", "--out", "{root}/rq", "--batch-size", "1000000000"], "eval recall", "GiB avail"),
    # convert, sft, demo, bench
    (["convert", "{root}/model", "{root}/afile", "--to", "hf"], "convert", "afile is a file"),
    (["demo", "--out", "{root}/dm", "--device", "bogus"], "demo", "unknown device 'bogus'"),
    (["demo", "--out", "{root}/afile", "--quick"], "demo", "afile is a file"),
]


@pytest.mark.parametrize(("argv", "command", "match"), CASES, ids=[" ".join(c[0][:2] + c[0][-2:]) for c in CASES])
def test_bad_input_is_one_clear_line(files, capsys, argv, command, match):
    argv = [a.replace("{root}", str(files)) for a in argv]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"ratplus {command}: error: ") and match in lines[-1], lines
    assert not any("Traceback" in line for line in lines)


def test_a_bug_still_shows_its_traceback(files, monkeypatch):
    """Only bad input is turned into an error line; a programming error keeps its traceback."""
    import ratplus.generation

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(ratplus.generation, "generate", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["generate", "--ckpt", str(files / "model"), "--prompt-ids", "1"])


def test_a_diverged_run_is_one_line(files, monkeypatch, capsys):
    """A loss that turns NaN (FloatingPointError from the trainer or the recall probe) ends the command
    with one line naming it, not a stack."""
    import ratplus.train.trainer

    def diverged(cfg):
        raise FloatingPointError("loss is nan at step 3; lower the learning rate")

    monkeypatch.setattr(ratplus.train.trainer, "train", diverged)
    argv = [a.replace("{root}", str(files)) for a in T]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "ratplus train: error: loss is nan at step 3; lower the learning rate", lines


@pytest.mark.parametrize("command", ["adapt", "sft"])
def test_dry_run_prints_the_plan_and_writes_nothing(files, capsys, command):
    """adapt and sft take --dry-run like train: the memory plan is printed, no output folder is made
    (the dry run refuses what the run refuses: --seq-len within max_seq_len 256, a tokenizer)."""
    from ratplus.io.tokenizer import train_bpe

    out = files / f"dry_{command}"
    model = files / f"model_tok_{command}"  # tiny's 256 ids are too few for the bundled corpus's BPE
    tok = train_bpe(["To be, or not to be."] * 5, 300)
    torch.manual_seed(0)
    save_pretrained(RATPlusLM(ModelConfig.from_preset("tiny", vocab_size=300)), model, tokenizer=tok)
    if command == "adapt":
        extra = ["--pattern", "D4", "--steps", "1", "--seq-len", "64"]
    else:
        extra = ["--data", str(files / "sft.jsonl")]
    assert main([command, "--ckpt", str(model), *extra, "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "total per process" in printed and "-> fits" in printed
    assert not out.exists()


A = ["adapt", "--ckpt", "{root}/model", "--steps", "1", "--out", "{root}/dry_a"]
S = ["sft", "--ckpt", "{root}/model", "--out", "{root}/dry_s"]
#: what the real run refuses, the dry run refuses with the same line (one code path: the dry run is the
#: real run stopped before the model is built)
DRY_CASES = [
    ([*T, "--no-joint-train", "--train-pattern", "snapkv-C16-O4"], "train", "is inference-only (SnapKV)"),
    ([*T, "--no-joint-train", "--train-pattern", "topk-B8-K1"], "train", "is inference-only (top-k blocks)"),
    ([*T, "--sparse-pattern", "Dfoo"], "train", "unknown attention pattern 'Dfoo'"),
    ([*T, "--no-joint-train", "--train-pattern", "D8:3+D4:3"], "train", "covers 6 heads but the layer has num_heads=4"),
    ([*T, "--seq-len", "100000"], "train", "seq_len=100000 is above the model's max_seq_len=256"),
    ([*T, "--seq-len", "64"], "train", "data folder not found"),
    ([*T, "--data", "{root}/tokdata", "--seq-len", "250"], "train", "too few for one window of seq_len=250"),
    ([*A, "--pattern", "snapkv-C16-O4"], "adapt", "is inference-only (SnapKV)"),
    ([*A, "--pattern", "D4", "--data", "{root}/nodata"], "adapt", "data folder not found"),
    ([*S, "--data", "{root}/sft.jsonl"], "sft", "SFT needs the model's tokenizer"),
]


@pytest.mark.parametrize(("argv", "command", "match"), DRY_CASES, ids=[" ".join(c[0][-2:]) for c in DRY_CASES])
def test_dry_run_refuses_what_the_run_refuses(files, capsys, argv, command, match):
    from ratplus.io.tokenizer import train_bpe
    from ratplus.train.data import prepare_shards

    if not (files / "tokdata").exists():  # a few hundred tokens: too short for long windows
        prepare_shards(["To be, or not to be. " * 10], train_bpe(["To be, or not to be."] * 5, 300), files / "tokdata")
    argv = [a.replace("{root}", str(files)) for a in argv]
    errors = []
    for dry in (True, False):
        assert main([*argv, *(["--dry-run"] if dry else [])]) == 2, dry
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert lines[-1].startswith(f"ratplus {command}: error: ") and match in lines[-1], lines
        assert "-> fits" not in captured.out
        errors.append(lines[-1])
    assert errors[0] == errors[1]
    assert not any((files / d).exists() for d in ("run", "dry_a", "dry_s"))

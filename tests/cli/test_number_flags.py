"""Every number flag of every command goes through one parser (``ratplus.cli.common.number`` and the
types built on it): nan, inf, a value that overflows, a negative or out-of-range value, and an empty
list or list entry stop at the command line as argparse's one line naming the flag, exit code 2,
before anything is read or loaded (the paths below need not exist)."""

from __future__ import annotations

import argparse
import math

import pytest

from ratplus.cli import build_parser, main
from ratplus.cli.common import INT_MAX, byte_size, comma_list, ints, names, number, positive_int
from tests.cli.test_help import COMMANDS, _flags

M = "no/such/model"
T = ["train", "--model", "tiny", "--out", "no/such/run", "--steps", "1"]
G = ["generate", "--ckpt", M, "--prompt-ids", "1"]
P = ["eval", "ppl", "--ckpt", M, "--data", "no/such.txt"]
D = ["data", "prepare", "--input", "no/such.txt", "--out", "no/such/out"]
S = ["serve", "--ckpt", M]
R = ["eval", "recall", "--quick", "--out", "no/such/recall"]
TUNE = ["tune-pattern", "--ckpt", M, "--data", "no/such.txt", "--kv-budget", "0.5"]

CASES = [
    # the cases (issue 31)
    ([*S, "--kv-memory", "1e999"], "serve", "--kv-memory", "expected a positive size below 8 EiB"),
    ([*S, "--kv-memory", "1e30"], "serve", "--kv-memory", "got '1e30'"),
    ([*S, "--kv-memory=-4GiB"], "serve", "--kv-memory", "expected a positive size"),
    ([*S, "--kv-memory", "0"], "serve", "--kv-memory", "expected a positive size"),
    ([*S, "--max-body", "1e999"], "serve", "--max-body", "expected a positive size below 8 EiB"),
    ([*S, "--prefix-cache-memory", "1e999"], "serve", "--prefix-cache-memory", "below 8 EiB"),
    ([*S, "--shutdown-grace", "inf"], "serve", "--shutdown-grace", "expected a finite number in [0, 10000000]"),
    ([*S, "--shutdown-grace", "nan"], "serve", "--shutdown-grace", "got 'nan'"),
    ([*S, "--shutdown-grace", "1e300"], "serve", "--shutdown-grace", "got '1e300'"),
    ([*S, "--shutdown-grace", "-1"], "serve", "--shutdown-grace", "got '-1'"),
    ([*S, "--patterns", ","], "serve", "--patterns", "got an empty list ','"),
    ([*S, "--patterns", "dense,,D4"], "serve", "--patterns", "got an empty entry in 'dense,,D4'"),
    ([*S, "--port", "70000"], "serve", "--port", "expected a whole number in [0, 65535]"),
    ([*S, "--max-batch", "0"], "serve", "--max-batch", "expected a whole number >= 1, got '0'"),
    ([*S, "--threads", "-1"], "serve", "--threads", "expected a whole number >= 0"),
    ([*D, "--bpe-sample", "0"], "data prepare", "--bpe-sample", "expected a whole number >= 1, got '0'"),
    ([*D, "--bpe-sample", "-1"], "data prepare", "--bpe-sample", "got '-1'"),
    ([*TUNE, "--ladder", "D4,,D8"], "tune-pattern", "--ladder", "got an empty entry in 'D4,,D8'"),
    ([*TUNE, "--ladder", ","], "tune-pattern", "--ladder", "got an empty list"),
    (["tune-pattern", "--ckpt", M, "--data", "x", "--kv-budget", "0"], "tune-pattern", "--kv-budget", "in (0, 1]"),
    (["tune-pattern", "--ckpt", M, "--data", "x", "--kv-budget", "nan"], "tune-pattern", "--kv-budget", "'nan'"),
    # train and its siblings: nan/inf/negative/zero where the flag needs a positive number
    ([*T, "--lr", "nan"], "train", "--lr", "expected a finite number > 0, got 'nan'"),
    ([*T, "--lr", "inf"], "train", "--lr", "got 'inf'"),
    ([*T, "--lr", "1e999"], "train", "--lr", "got '1e999' (beyond the float range)"),
    ([*T, "--weight-decay", "nan"], "train", "--weight-decay", "expected a finite number >= 0"),
    ([*T, "--grad-clip", "inf"], "train", "--grad-clip", "got 'inf'"),
    ([*T, "--warmup", "nan"], "train", "--warmup", "expected a finite number in [0, 1]"),
    ([*T, "--keep-last", "0"], "train", "--keep-last", "expected a whole number >= 1"),
    ([*T, "--steps", str(2**63)], "train", "--steps", "(beyond an int64: at most 2**63 - 1)"),
    ([*T, "--steps", "1e3"], "train", "--steps", "expected a whole number >= 1, got '1e3'"),
    ([*T, "--seed", "-1"], "train", "--seed", "expected a whole number >= 0"),
    ([*T, "--eval-patterns", ",,"], "train", "--eval-patterns", "got an empty list ',,'"),
    ([*T, "--activation-checkpointing", "-2"], "train", "--activation-checkpointing", "expected off, all or"),
    (["uptrain", "--init", M, "--gate-init=-inf"], "uptrain", "--gate-init", "expected a finite number"),
    (["uptrain", "--init", M, "--gate-open", "2"], "uptrain", "--gate-open", "in [0, 1]"),
    (["adapt", "--ckpt", M, "--pattern", "D4", "--tokens", "0"], "adapt", "--tokens", "whole number >= 1"),
    (["sft", "--ckpt", M, "--data", "x.jsonl", "--epochs", "inf"], "sft", "--epochs", "got 'inf'"),
    # data prepare
    ([*D, "--val-fraction", "nan"], "data prepare", "--val-fraction", "expected a finite number in [0, 1]"),
    ([*D, "--val-fraction", "-0.5"], "data prepare", "--val-fraction", "got '-0.5'"),
    ([*D, "--val-docs", "-3"], "data prepare", "--val-docs", "expected a whole number >= 0"),
    ([*D, "--shard-tokens", "0"], "data prepare", "--shard-tokens", "expected a whole number >= 1"),
    ([*D, "--workers", "0"], "data prepare", "--workers", "expected a whole number >= 1"),
    # generate
    ([*G[:3], "--prompt-ids", "-1"], "generate", "--prompt-ids", "expected a whole number >= 0, got '-1'"),
    ([*G[:3], "--prompt-ids", "1,,2"], "generate", "--prompt-ids", "empty entry"),
    ([*G, "--temperature", "nan"], "generate", "--temperature", "got 'nan'"),
    ([*G, "--temperature", "-1"], "generate", "--temperature", "expected a finite number >= 0"),
    ([*G, "--top-p", "2"], "generate", "--top-p", "expected a finite number in (0, 1]"),
    ([*G, "--top-p", "0"], "generate", "--top-p", "in (0, 1]"),
    ([*G, "--top-k", "-1"], "generate", "--top-k", "expected a whole number >= 0"),
    ([*G, "--max-new-tokens", "0"], "generate", "--max-new-tokens", "whole number >= 1"),
    # eval
    ([*P, "--max-tokens", "-5"], "eval ppl", "--max-tokens", "expected a whole number >= 1, got '-5'"),
    ([*P, "--seq-len", "0"], "eval ppl", "--seq-len", "got '0'"),
    ([*P, "--batch-size", "0"], "eval ppl", "--batch-size", "got '0'"),
    ([*P, "--patterns", ","], "eval ppl", "--patterns", "got an empty list"),
    (["eval", "budget", "--ckpt", M, "--data", "x", "--batch-size", "0"], "eval budget", "--batch-size", "got '0'"),
    (["eval", "niah", "--ckpt", M, "--depths", "101"], "eval niah", "--depths", "percentages in [0, 100]"),
    (["eval", "niah", "--ckpt", M, "--lengths", "1024,-1"], "eval niah", "--lengths", "got '-1'"),
    (
        ["eval", "niah-data", "--tokenizer", M, "--out", "x", "--num-samples", "0"],
        "eval niah-data",
        "--num-samples",
        ">= 1",
    ),
    (["eval", "longbench", "--ckpt", M, "--data", "x", "--limit", "0"], "eval longbench", "--limit", ">= 1"),
    ([*R, "--lr", "inf"], "eval recall", "--lr", "got 'inf'"),
    ([*R, "--adapt-lr-mult", "inf"], "eval recall", "--adapt-lr-mult", "expected a finite number > 0"),
    ([*R, "--threads", "-1"], "eval recall", "--threads", "expected a whole number >= 0"),
    ([*R, "--pairs", "0"], "eval recall", "--pairs", "expected a whole number >= 1"),
    # demo, convert, bench
    (["demo", "--recall-lr", "inf"], "demo", "--recall-lr", "expected a finite number > 0, got 'inf'"),
    (["demo", "--recall-steps", "0"], "demo", "--recall-steps", "expected a whole number >= 1"),
    (["demo", "--pretrain-tokens", "-1"], "demo", "--pretrain-tokens", "got '-1'"),
    (["demo", "--dense-warmup", "nan"], "demo", "--dense-warmup", "got 'nan'"),
    (["convert", M, "out", "--num-heads", "0"], "convert", "--num-heads", "expected a whole number >= 1"),
    (["convert", M, "out", "--eos-token-id", "-2"], "convert", "--eos-token-id", "expected a whole number >= 0"),
    (["bench", "attention", "--seq-lens", "0"], "bench attention", "--seq-lens", "got '0'"),
    (["bench", "attention", "--seq-lens", "1k"], "bench attention", "--seq-lens", "got '1k'"),
    (["bench", "attention", "--repeats", "0"], "bench attention", "--repeats", ">= 1"),
    (["bench", "decode", "--steps", "0"], "bench decode", "--steps", "expected a whole number >= 1"),
    (["bench", "decode", "--threads", "-1"], "bench decode", "--threads", ">= 0"),
    (["bench", "serve", "--kv-memory", "1e999"], "bench serve", "--kv-memory", "below 8 EiB"),
    (["bench", "serve", "--soak-seconds", "inf"], "bench serve", "--soak-seconds", "got 'inf'"),
    (["bench", "serve", "--clients", "1,,4"], "bench serve", "--clients", "empty entry"),
]


@pytest.mark.parametrize(("argv", "command", "flag", "match"), CASES, ids=[f"{c[1]} {c[2]} {c[0][-1]}" for c in CASES])
def test_a_bad_number_is_refused_at_the_command_line(capsys, argv, command, flag, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith(f"ratplus {command}: error: argument {flag}: "), lines
    assert match in lines[-1], lines
    assert "Traceback" not in captured.err and "listening" not in captured.err and not captured.out


def test_every_number_flag_goes_through_the_common_parser():
    """A flag typed plainly ``int`` or ``float`` would take nan, inf, 10**30 or -1 without a word."""
    plain = [
        f"ratplus {' '.join(path)} {'/'.join(a.option_strings) or a.dest}"
        for path, parser in COMMANDS
        for a in _flags(parser)
        if a.type in (int, float)
    ]
    assert not plain, f"number flags not parsed by ratplus.cli.common.number: {', '.join(plain)}"


@pytest.mark.parametrize(
    ("kind", "low", "high", "text", "ok"),
    [
        (float, None, None, "-1.5", -1.5),
        (float, None, None, "nan", None),
        (float, None, None, "-inf", None),
        (float, None, None, "1e309", None),
        (float, 0, None, "0", 0.0),
        (float, 0, None, "-0.0001", None),
        (float, 0, 1, "1", 1.0),
        (float, 0, 1, "1.0000001", None),
        (int, 1, None, str(INT_MAX), INT_MAX),
        (int, 1, None, str(INT_MAX + 1), None),
        (int, None, None, str(-INT_MAX - 2), None),
        (int, 1, None, " 7 ", 7),
        (int, 1, None, "7.0", None),
        (int, 0, 65535, "65535", 65535),
    ],
)
def test_number(kind, low, high, text, ok):
    parse = number(kind, low, high)
    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            parse(text)
    else:
        value = parse(text)
        assert value == ok and type(value) is kind and math.isfinite(value)


def test_open_ends():
    parse = number(float, 0, 1, low_open=True, high_open=True)
    assert parse("0.5") == 0.5
    for text in ("0", "1"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"in \(0, 1\)"):
            parse(text)


def test_byte_size():
    assert byte_size("4GiB") == 4 * 2**30 and byte_size("512MB") == 512 * 10**6 and byte_size("1e9") == 10**9
    for text in ("1e999", "1e19", "0", "-1", "lots", "4 parsecs", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a positive size"):
            byte_size(text)


def test_lists():
    assert ints("1, 2,3") == [1, 2, 3] and names("dense,D16-W256-P4") == ["dense", "D16-W256-P4"]
    assert comma_list(positive_int, "sizes")("5") == [5]
    for text in ("", ",", " , ", "1,,2", "1,2,", ",1"):
        with pytest.raises(argparse.ArgumentTypeError, match="empty"):
            ints(text)
    with pytest.raises(argparse.ArgumentTypeError, match="in '1,0': expected a whole number >= 1, got '0'"):
        ints("1,0")


def test_defaults_pass_their_own_types():
    """A default given as text (``--kv-memory 4GiB``, ``--patterns D4,D16``) goes through its type like a
    value typed by hand: the bare command lines parse."""
    parser = build_parser()
    assert parser.parse_args(["serve", "--ckpt", M]).kv_memory == 4 * 2**30
    assert parser.parse_args(["bench", "serve"]).kv_memory == 2 * 2**30
    assert parser.parse_args(["bench", "attention"]).patterns[0] == "D4"


def test_the_library_size_parser_refuses_what_no_int_holds():
    """``parse_bytes`` (under ``byte_size``, and called by library users directly) says so instead of
    raising OverflowError from ``int(inf)``."""
    from ratplus.serve.admission import parse_bytes

    for text in ("1e999", "1e19", "9000000TiB"):
        with pytest.raises(ValueError, match="must be below 8 EiB"):
            parse_bytes(text, "--max-body")
    assert parse_bytes("8e18") == 8 * 10**18

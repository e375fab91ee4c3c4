"""RULER NIAH: task structure, token-exact sizing, needle depth, determinism and splits, scoring,
evaluation plumbing, CLI, and a clear error for each bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import folder_digest, make_model

from ratplus import cli
from ratplus.eval import niah
from ratplus.eval._decode import greedy_generate
from ratplus.eval.common import EvalModel
from ratplus.eval.niah import (
    NEEDLE,
    NIAH_TASKS,
    NOISE,
    evaluate_niah,
    generate_niah,
    prompt_of,
    string_match_all,
    to_sft,
    word_lists,
)

NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
LEN = 512
NEW = 16


@pytest.fixture(scope="module")
def samples(tokenizer):
    return generate_niah(tokenizer, None, [LEN], num_samples=2, depths=[0, 100], max_new_tokens=NEW, progress=False)


def _context(rec):
    return rec["input"].split("\n", 1)[1].rsplit("\n", 1)[0]


def test_task_structure(samples):
    adjs, nouns = word_lists()
    by_task = {}
    for r in samples:
        by_task.setdefault(r["task"], []).append(r)
    assert set(by_task) == set(NIAH_TASKS)
    for name, recs in by_task.items():
        task = NIAH_TASKS[name]
        for r in recs:
            needles = NEEDLE_RE.findall(r["input"])
            golds = r["outputs"]
            assert len(golds) == task.num_queries * task.num_values
            asked = r["query"].replace(", and ", ", ").split(", ")
            assert len(asked) == task.num_queries
            gold_needles = [n for n in needles if n[1] in asked]
            assert sorted(v for _, _, v in gold_needles) == sorted(golds)  # every gold value is in the text once
            for kind, key, value in needles:
                assert kind == task.value_type
                if task.value_type == "numbers":
                    assert re.fullmatch(r"[1-9]\d{6}", value)
                else:
                    assert UUID_RE.match(value)
                if task.key_type == "uuids":
                    assert UUID_RE.match(key)
                else:
                    adj, noun = key.split("-")
                    assert adj in adjs and noun in nouns
            if task.haystack == "needles":  # every haystack line is a distractor needle with another key
                lines = _context(r).split("\n")
                assert len(lines) == r["haystack_units"] + 1 and all(NEEDLE_RE.fullmatch(ln) for ln in lines)
                assert len({k for _, k, _ in needles}) == len(needles)
            elif task.haystack == "noise":
                assert _context(r).count(NOISE) == r["haystack_units"]
                assert len(needles) == 1
            else:
                assert len(needles) == task.num_keys * task.num_values
            if len(golds) == 1:
                assert r["input"].startswith(f"A special magic {task.value_type[:-1]} is hidden")
                assert r["answer_prefix"].endswith("mentioned in the provided text is")
            else:
                assert r["input"].startswith(f"Some special magic {task.value_type} are hidden")
                assert r["answer_prefix"].endswith("mentioned in the provided text are")


def test_sizing_is_token_exact_and_tight(samples, tokenizer):
    for r in samples:
        n = len(tokenizer.encode(prompt_of(r)).ids)
        assert n == r["prompt_tokens"]
        assert n + NEW <= LEN
        assert r["haystack_units"] >= 1
        if r["haystack"] != "essay":  # one more haystack line would not have fitted
            unit = max(len(tokenizer.encode("\n" + line).ids) for line in _context(r).split("\n"))
            assert LEN - (n + NEW) < unit + 1


def test_needle_depth(samples):
    for r in samples:
        if r["task"] not in ("niah_single_1", "niah_multikey_2"):
            continue
        ctx = _context(r)
        gold = NEEDLE.format(type_v="numbers", key=r["query"], value=r["outputs"][0])
        lines = ctx.split("\n")
        if r["depth"] == 0:
            assert lines[0] == gold
        else:
            assert lines[-1] == gold


def test_middle_depth_in_essay(tokenizer, tmp_path):
    essay = tmp_path / "essay.txt"
    essay.write_text(" ".join(f"Sentence number {i} is here." for i in range(400)))
    (r,) = generate_niah(
        tokenizer, "niah_single_2", [LEN], 1, depths=[50], essay_path=essay, max_new_tokens=NEW, progress=False
    )
    ctx = _context(r)
    pos = ctx.index("One of the special magic numbers")
    assert 0.3 < pos / len(ctx) < 0.7
    assert "Sentence number" in ctx


def test_deterministic_and_splits_disjoint(tokenizer):
    kw = dict(tasks="niah_single_3,niah_multivalue", lengths=[LEN], num_samples=3, max_new_tokens=NEW, progress=False)
    a = generate_niah(tokenizer, split="test", seed=0, **kw)
    b = generate_niah(tokenizer, split="test", seed=0, **kw)
    train = generate_niah(tokenizer, split="train", seed=0, **kw)
    other = generate_niah(tokenizer, split="test", seed=1, **kw)
    assert a == b
    gold = lambda recs: {v for r in recs for v in r["outputs"]}  # noqa: E731
    assert not gold(a) & gold(train)
    assert not gold(a) & gold(other)
    sft = to_sft(train[0])
    assert sft["prompt"] == prompt_of(train[0])
    assert sft["answer"] == " " + ", ".join(train[0]["outputs"]) + "."


def test_string_match_all():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("only 456", ["123", "456", "789", "000"]) == 0.25
    assert string_match_all("ABC-def", ["abc-DEF"]) == 1.0  # case-insensitive
    assert string_match_all("", ["1"]) == 0.0
    with pytest.raises(ValueError, match="no gold"):
        string_match_all("x", [])


def test_evaluate_plumbing_scores_what_the_model_says(tokenizer, samples, monkeypatch):
    """A generator that says the first gold value: single-answer tasks 100, 4-answer tasks 25."""
    em = EvalModel(make_model(tokenizer), tokenizer)

    def says_first_gold(model, ids, max_new_tokens, pattern=None, stop_ids=()):
        prompt = tokenizer.decode(ids[0].tolist())
        rec = next(r for r in samples if prompt_of(r) == prompt)
        answer = [*tokenizer.encode(" " + rec["outputs"][0] + ".").ids, tokenizer.token_to_id("<|endoftext|>")]
        return torch.cat([ids, torch.tensor([answer])], dim=1)

    monkeypatch.setattr(niah, "greedy_generate", says_first_gold)
    result = evaluate_niah(em, samples, pattern="D4-W16-P2", progress=False)
    expect = {t: (100.0 if NIAH_TASKS[t].num_gold == 1 else 25.0) for t in NIAH_TASKS}
    assert {t: s[str(LEN)] for t, s in result["scores"].items() if t != "mean"} == expect
    assert result["scores"]["mean"][str(LEN)] == pytest.approx(sum(expect.values()) / 8)
    assert result["status"] == "not adapted (no adaptation recorded)"
    assert all(s["prediction"] == " " + s["outputs"][0] + "." for s in result["samples"])


def test_greedy_generate_is_argmax_of_full_forward(tokenizer):
    model = make_model(tokenizer)
    ids = torch.tensor([tokenizer.encode(NOISE * 2).ids])
    out = greedy_generate(model, ids, 6, pattern="D4-W8-P1")
    assert out.shape == (1, ids.shape[1] + 6)
    with torch.no_grad():
        for t in range(ids.shape[1], out.shape[1]):
            assert int(out[0, t]) == int(model(out[:, :t], pattern="D4-W8-P1")[0, -1].argmax())
        first = int(out[0, ids.shape[1]])
    stopped = greedy_generate(model, ids, 6, pattern="D4-W8-P1", stop_ids=[first])
    assert stopped.shape[1] == ids.shape[1] + 1


def test_cli_niah_end_to_end(ckpt, tmp_path, capsys):
    before = folder_digest(ckpt)
    data = tmp_path / "test.jsonl"
    sft = tmp_path / "train_sft.jsonl"
    gen = f"eval niah-data --lengths 256 --max-new-tokens 4 --quiet --tokenizer {ckpt}"
    assert cli.main(f"{gen} --tasks niah_single_1 --num-samples 2 --out {data}".split()) == 0
    gen_sft = f"{gen}/tokenizer.json --tasks niah_multikey_2 --num-samples 3 --split train --format sft --out {sft}"
    assert cli.main(gen_sft.split()) == 0
    assert [set(json.loads(ln)) for ln in sft.read_text().splitlines()] == [{"prompt", "answer", "task", "length"}] * 3
    out = tmp_path / "out"
    rc = cli.main(f"eval niah --ckpt {ckpt} --pattern dense,D4-W16-P2 --data {data} --out {out} --quiet".split())
    assert rc == 0
    assert folder_digest(ckpt) == before
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["pattern"], r["status"]) for r in record["results"]] == [("dense", "dense"), ("D4-W16-P2", "adapted")]
    preds = [json.loads(ln) for ln in (out / "niah_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all(0.0 <= p["score"] <= 1.0 for p in preds)


def test_niah_bad_input(tokenizer, ckpt, tmp_path, capsys):
    with pytest.raises(ValueError, match="NIAH length 1024 exceeds the model's max_seq_len=512"):
        generate_niah(tokenizer, "niah_single_1", [1024], 1, max_len=512, progress=False)
    with pytest.raises(ValueError, match="NIAH length 40 is too short for niah_multiquery"):
        generate_niah(tokenizer, "niah_multiquery", [40], 1, max_new_tokens=8, progress=False)
    missing = tmp_path / "no-essay.txt"
    with pytest.raises(FileNotFoundError, match=r"NIAH essay file not found: .*no-essay\.txt"):
        generate_niah(tokenizer, "niah_single_2", [LEN], 1, essay_path=missing, progress=False)
    with pytest.raises(ValueError, match=r"unknown NIAH task.*niah_single_9"):
        generate_niah(tokenizer, "niah_single_9", [LEN], 1, progress=False)
    with pytest.raises(ValueError, match="depth 120"):
        generate_niah(tokenizer, "niah_single_1", [LEN], 1, depths=[120], progress=False)
    em = EvalModel(make_model(tokenizer, max_seq_len=256), tokenizer)
    with pytest.raises(ValueError, match="NIAH length 512 exceeds the model's max_seq_len=256"):
        evaluate_niah(
            em, [{"task": "niah_single_1", "length": 512, "input": "x", "answer_prefix": "y", "outputs": ["1"]}]
        )
    with pytest.raises(ValueError, match=r"NIAH sample 0: missing field.*outputs"):
        evaluate_niah(em, [{"task": "niah_single_1", "length": 64, "input": "x", "answer_prefix": "y"}])
    rc = cli.main(["eval", "niah", "--ckpt", str(ckpt), "--lengths", "4096", "--tasks", "niah_single_1", "--quiet"])
    assert rc == 2 and "NIAH length 4096 exceeds the model's max_seq_len=512" in capsys.readouterr().err

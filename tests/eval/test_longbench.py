"""LongBench v1: each scorer on hand-computed cases, middle truncation, record validation, and the
runner end to end on a few hand-made records (prompt budget, scores, files, untouched checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import folder_digest, make_model

from ratplus import cli
from ratplus.eval import longbench
from ratplus.eval.common import EvalModel
from ratplus.eval.longbench import (
    LONGBENCH_TASKS,
    classification_score,
    count_score,
    edit_similarity,
    evaluate_longbench,
    load_longbench,
    qa_f1_score,
    retrieval_score,
    rouge_l_score,
    score_record,
    truncate_middle,
)


def test_qa_f1():
    assert qa_f1_score("The Eiffel Tower.", "eiffel tower") == 1.0  # case, punctuation, articles ignored
    assert qa_f1_score("Paris France", "Paris") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert qa_f1_score("London", "Paris") == 0.0


def test_rouge_l():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5 tokens: P = 5/6, R = 1
    assert rouge_l_score("the cat sat on the mat", "The cat on the mat") == pytest.approx(2 * (5 / 6) / (5 / 6 + 1))
    assert rouge_l_score("a b c", "c b a") == pytest.approx(1 / 3)
    assert rouge_l_score("", "x") == 0.0


def test_classification():
    classes = ["Location", "Number", "Abbreviation", "Person", "Number of people"]
    assert classification_score("Location", "Location", all_classes=classes) == 1.0
    assert classification_score("Location or Person", "Person", all_classes=classes) == 0.5
    assert classification_score("Person", "Location", all_classes=classes) == 0.0
    # "Number" is part of the gold name "Number of people": it does not count as a second guess
    assert classification_score("Number of people", "Number of people", all_classes=classes) == 1.0
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("x", "y", all_classes=None)


def test_count_and_retrieval():
    assert count_score("There are 4 unique paragraphs.", "4") == 1.0
    assert count_score("3 or 4", "4") == 0.5
    assert count_score("none", "4") == 0.0
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    with pytest.raises(ValueError, match="Paragraph N"):
        retrieval_score("3", "three")


def test_edit_similarity():
    assert edit_similarity("x = foo(1)\nmore", "x = foo(1)") == 1.0
    assert edit_similarity("# a comment\n\n    return a + b", "    return a + b") == 1.0  # first code line
    assert edit_similarity("abc", "abd") == 0.67  # 2 * LCS 2 / 6, rounded like fuzz.ratio
    assert edit_similarity("", "abc") == 0.0


def test_score_record_postprocessing():
    rec = {"answers": ["Paris", "paris, france"], "all_classes": None}
    assert score_record("triviaqa", "\nParis\nQuestion: next", rec) == 1.0  # few-shot: first line only
    assert score_record("hotpotqa", "Paris\nQuestion: next", rec) < 1.0
    assert score_record("lcc", "    x = 1", {"answers": ["    x = 1"]}) == 1.0  # code keeps indentation


def test_truncate_middle():
    ids = list(range(10))
    assert truncate_middle(ids, 10) == ids
    assert truncate_middle(ids, 5) == [0, 1, 7, 8, 9]
    assert truncate_middle(ids, 4) == [0, 1, 8, 9]
    with pytest.raises(ValueError, match="budget"):
        truncate_middle(ids, 1)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


QA = {"input": "Where is the tower?", "context": "The tower is in Paris. " * 40, "answers": ["Paris"], "length": 200}


def test_load_longbench_and_errors(tmp_path):
    d = tmp_path / "lb"
    d.mkdir()
    _write(d / "hotpotqa.jsonl", [QA, {**QA, "answers": ["France"]}])
    _write(d / "trec.jsonl", [{"input": "Q?", "context": "ex", "answers": ["Number"], "all_classes": ["Number"]}])
    _write(d / "lcc_e.jsonl", [{"input": "", "context": "def f():\n", "answers": ["    return 1"]}])
    data = load_longbench([d])
    assert {k: len(v) for k, v in data.items()} == {"hotpotqa": 2, "trec": 1, "lcc": 1}
    assert list(load_longbench([d], ["trec"])) == ["trec"]

    bad = tmp_path / "bad"
    bad.mkdir()
    f = _write(bad / "qasper.jsonl", [QA])
    f.write_text(f.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"qasper\.jsonl line 2: not valid JSON"):
        load_longbench([f])
    _write(f, [QA, {"input": "q", "context": "c"}])
    with pytest.raises(ValueError, match=r"qasper\.jsonl line 2: field 'answers' must be a non-empty list"):
        load_longbench([f])
    _write(f, [{"input": 3, "context": "c", "answers": ["a"]}])
    with pytest.raises(ValueError, match=r"line 1: field 'input' must be a string"):
        load_longbench([f])
    t = _write(bad / "trec.jsonl", [{"input": "q", "context": "c", "answers": ["Number"]}])
    with pytest.raises(ValueError, match=r"trec\.jsonl line 1: dataset trec needs 'all_classes'"):
        load_longbench([t])
    u = _write(bad / "mystery.jsonl", [QA])
    with pytest.raises(ValueError, match=r"mystery\.jsonl line 1: the file name is not a LongBench dataset"):
        load_longbench([u])
    with pytest.raises(ValueError, match="unknown LongBench dataset 'nope'"):
        load_longbench([d], ["nope"])
    with pytest.raises(FileNotFoundError, match="LongBench data not found"):
        load_longbench([tmp_path / "missing.jsonl"])
    with pytest.raises(ValueError, match="no records for LongBench dataset"):
        load_longbench([d / "trec.jsonl"], ["hotpotqa"])


def test_runner_truncates_and_scores(tokenizer, monkeypatch):
    em = EvalModel(make_model(tokenizer, max_seq_len=256), tokenizer)
    data = {"hotpotqa": [QA, {**QA, "answers": ["Rome"]}]}
    seen = []

    def answers_paris(model, ids, max_new_tokens, pattern=None, stop_ids=()):
        seen.append((ids.shape[1], max_new_tokens, pattern))
        return torch.cat([ids, torch.tensor([tokenizer.encode(" Paris").ids])], dim=1)

    monkeypatch.setattr(longbench, "greedy_generate", answers_paris)
    r = evaluate_longbench(em, data, pattern="D4", context_length=4096, progress=False)
    assert r["context_length"] == 256  # capped at the model's max_seq_len
    assert r["scores"] == {"hotpotqa": 50.0}
    budget = 256 - LONGBENCH_TASKS["hotpotqa"].max_new_tokens
    prompt = LONGBENCH_TASKS["hotpotqa"].prompt.format(context=QA["context"], input=QA["input"])
    full = tokenizer.encode(prompt).ids
    assert len(full) > budget  # the record really was truncated...
    assert seen[0] == (budget, 32, "D4")  # ...to exactly the budget, with the dataset's generation length
    assert r["predictions"][0]["pred"] == " Paris"


def test_cli_longbench_end_to_end(ckpt, tmp_path, capsys):
    d = tmp_path / "lb"
    d.mkdir()
    _write(d / "hotpotqa.jsonl", [QA])
    _write(d / "passage_count.jsonl", [{"input": "", "context": "Paragraph 1: a. Paragraph 2: a.", "answers": ["1"]}])
    _write(d / "gov_report.jsonl", [{"input": "", "context": "A long report.", "answers": ["Summary."]}])
    before = folder_digest(ckpt)
    out = tmp_path / "out"
    args = f"eval longbench --ckpt {ckpt} --data {d} --pattern D4-W16-P2 --context-length 200 --out {out} --quiet"
    assert cli.main(args.split()) == 2  # gov_report generates 512 tokens: no room in a 200-token context
    assert "context length 200 leaves no room for gov_report's prompt" in capsys.readouterr().err
    rc = cli.main([*args.split(), "--datasets", "hotpotqa"])
    assert rc == 0
    assert folder_digest(ckpt) == before
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (res,) = record["results"]
    assert res["status"] == "adapted" and set(res["scores"]) == {"hotpotqa"}  # --datasets picks one
    preds = [json.loads(ln) for ln in (out / "longbench_predictions.jsonl").read_text().splitlines()]
    assert all(p["prompt_tokens"] <= 200 - LONGBENCH_TASKS[p["dataset"]].max_new_tokens for p in preds)
    bad = _write(tmp_path / "qasper.jsonl", [{"input": "q", "context": "c", "answers": "Paris"}])
    rc = cli.main(["eval", "longbench", "--ckpt", str(ckpt), "--data", str(bad), "--quiet"])
    assert rc == 2 and "qasper.jsonl line 1: field 'answers'" in capsys.readouterr().err

"""lm-evaluation-harness adapter: loglikelihood / rolling / generate_until against independent
computations with the model, pattern plumbing, `python -m ratplus.cli.lm_eval` end to end on local
YAML + JSONL tasks (offline), and clear errors for bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import EOS, folder_digest, make_model

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from ratplus.cli import lm_eval as cli_lm_eval
from ratplus.eval.common import EvalModel, open_checkpoint
from ratplus.eval.harness import RATPlusHarnessLM

REPO = Path(__file__).resolve().parents[2]
LONG = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 3


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def _logp(model, ids, pattern):
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids]), pattern=pattern).double(), -1)[0]


@pytest.fixture(scope="module")
def em(tokenizer):
    return EvalModel(make_model(tokenizer), tokenizer)


@pytest.mark.parametrize("pattern", ["dense", "D4-W2-P1"])
def test_loglikelihood_matches_model(em, tokenizer, pattern):
    pairs = [(LONG, " The sky is blue."), ("Here we", " go"), ("", "To be, or not to be"), (LONG[:40], " again")]
    lm = RATPlusHarnessLM(model=em, pattern=pattern, batch_size=3)
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    eos = tokenizer.token_to_id(EOS)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        n = len(ctx) - len(ctx.rstrip())  # lm-eval moves a context's trailing spaces to the continuation
        ctx, cont = ctx[: len(ctx) - n], ctx[len(ctx) - n :] + cont
        c_ids = tokenizer.encode(ctx).ids if ctx else [eos]
        x_ids = tokenizer.encode(ctx + cont).ids[len(c_ids) :] if ctx else tokenizer.encode(cont).ids
        ids = c_ids + x_ids
        logp = _logp(em.model, ids[:-1], pattern)
        rows = range(len(c_ids) - 1, len(ids) - 1)
        want = sum(float(logp[i, ids[i + 1]]) for i in rows)
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(logp[i].argmax()) == ids[i + 1] for i in rows)
    one = RATPlusHarnessLM(model=em, pattern=pattern, batch_size=1)
    assert [a for a, _ in one.loglikelihood([_req("loglikelihood", *p) for p in pairs], True)] == pytest.approx(
        [a for a, _ in got], abs=1e-4
    )  # right padding in a batch changes nothing


def test_pattern_reaches_the_model(em):
    dense = RATPlusHarnessLM(model=em, pattern="dense")
    sparse = RATPlusHarnessLM(model=em, pattern="D4")
    req = [_req("loglikelihood", LONG, " The sky is blue.")]
    assert abs(dense.loglikelihood(req, True)[0][0] - sparse.loglikelihood(req, True)[0][0]) > 1e-5
    assert sparse.status == "not adapted (no adaptation recorded)"


def test_loglikelihood_rolling_windows(em, tokenizer):
    lm = RATPlusHarnessLM(model=em, pattern="D4-W2", max_length=16)
    ids = tokenizer.encode(LONG).ids
    seq = [tokenizer.token_to_id(EOS), *ids]  # seq[i + 1] == ids[i]
    want = 0.0
    for s in range(0, len(ids), 16):  # each token predicted once, with up to 16 tokens of context
        e = min(s + 16, len(ids))
        window = seq[max(0, e - 16) : e]
        logp = _logp(em.model, window, "D4-W2")
        for j in range(s, e):
            want += float(logp[j - max(0, e - 16), ids[j]])
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", LONG)], disable_tqdm=True)
    assert len(ids) > 32 and got == pytest.approx(want, abs=1e-3)


def test_generate_until_matches_manual_greedy(em, tokenizer):
    lm = RATPlusHarnessLM(model=em, pattern="local-W8-P2")
    ctx = "Here we go. The sky is"
    (text,) = lm.generate_until([_req("generate_until", ctx, {"until": ["\n", "sky"], "max_gen_toks": 7})], True)
    ids = tokenizer.encode(ctx).ids
    eos = tokenizer.token_to_id(EOS)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(7):
            t = int(em.model(torch.tensor([ids + out]), pattern="local-W8-P2")[0, -1].argmax())
            if t == eos:
                break
            out.append(t)
    want = tokenizer.decode(out)
    for u in ("\n", "sky"):
        want = want.split(u)[0]
    assert text == want


def test_bad_model_args(em, tmp_path):
    with pytest.raises(ValueError, match="ckpt=PATH"):
        RATPlusHarnessLM(pattern="D4")
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        RATPlusHarnessLM(ckpt=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="D0"):
        RATPlusHarnessLM(model=em, pattern="D0")
    with pytest.raises(ValueError, match="max_length=4096 exceeds the model's max_seq_len=512"):
        RATPlusHarnessLM(model=em, max_length=4096)


def test_missing_task_file_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_task.yaml"
    assert cli_lm_eval.main(["--model_args", "ckpt=x", "--tasks", f"arc_easy,{missing}"]) == 2
    assert f"lm-eval task file not found: {missing}" in capsys.readouterr().err
    assert cli_lm_eval.main(["--tasks", "x", "--include_path", str(tmp_path / "nodir")]) == 2
    assert "lm-eval include path not found" in capsys.readouterr().err


def test_ratplus_eval_lm_eval_reaches_the_wrapper(tmp_path, capsys):
    """`ratplus eval lm-eval ARGS` hands lm-eval's own options (--tasks, -h, ...) to the wrapper."""
    from ratplus.cli import main

    missing = tmp_path / "no_such_task.yaml"
    assert main(["eval", "lm-eval", "--model_args", "ckpt=x", "--tasks", str(missing)]) == 2
    assert f"ratplus eval lm-eval: error: lm-eval task file not found: {missing}" in capsys.readouterr().err


def _tasks(folder: Path) -> list[Path]:
    rows = {
        "mc": [
            {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
            {"question": "The grass is", "choices": ["blue", "green", "seven"], "label": 1},
            {"question": "Here we", "choices": ["go", "stop", "are"], "label": 0},
            {"question": "There and back", "choices": ["again", "forth", "then"], "label": 0},
        ],
        "gen": [{"prompt": "The sun is", "answer": " yellow"}, {"prompt": "Here we", "answer": " go"}],
        "roll": [{"text": "The grass is green. The sky is blue."}, {"text": "To be, or not to be."}],
    }
    specs = {
        "mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n",
        "gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\nmetric_list:\n  - metric: exact_match\n",
        "roll": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n",
    }
    paths = []
    for name, docs in rows.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        yaml = folder / f"tiny_{name}.yaml"
        yaml.write_text(
            f"task: tiny_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{specs[name]}metadata:\n  version: 1.0\n"
        )
        paths.append(yaml)
    return paths


def test_cli_end_to_end_offline(ckpt, tmp_path):
    """`python -m ratplus.cli.lm_eval` on local tasks; its metrics equal what the adapter computes."""
    yamls = _tasks(tmp_path)
    before = folder_digest(ckpt)
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"),
        "PYTHONPATH": str(REPO),
    }
    cmd = [sys.executable, "-m", "ratplus.cli.lm_eval", "--model", "ratplus", "--model_args",
           f"ckpt={ckpt},pattern=D4-W16-P2", "--tasks", ",".join(map(str, yamls)), "--batch_size", "2",
           "--device", "cpu", "--output_path", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert folder_digest(ckpt) == before
    (path,) = (tmp_path / "out").rglob("results*.json")
    res = json.loads(path.read_text())["results"]

    lm = RATPlusHarnessLM(model=open_checkpoint(ckpt), pattern="D4-W16-P2")
    docs = [json.loads(x) for x in (tmp_path / "mc.jsonl").read_text().splitlines()]
    correct = 0
    for d in docs:
        scores = lm.loglikelihood([_req("loglikelihood", d["question"], " " + c) for c in d["choices"]], True)
        correct += max(range(3), key=lambda i: scores[i][0]) == d["label"]
    assert res["tiny_mc"]["acc,none"] == pytest.approx(correct / len(docs))
    gens = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
    outs = lm.generate_until([_req("generate_until", g["prompt"], {"until": ["\n"], "max_gen_toks": 4}) for g in gens])
    exact = sum(o == g["answer"] for o, g in zip(outs, gens)) / len(gens)
    assert res["tiny_gen"]["exact_match,none"] == pytest.approx(exact)
    texts = [json.loads(x)["text"] for x in (tmp_path / "roll.jsonl").read_text().splitlines()]
    ll = lm.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts], True)
    bpb = -sum(ll) / sum(len(t.encode()) for t in texts) / math.log(2)
    assert res["tiny_roll"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-4)
    assert "not adapted" not in proc.stderr and "pattern D4-W16-P2 (adapted)" in proc.stderr


def test_evaluate_harness_in_process(tmp_path, tokenizer, monkeypatch):
    """The library entry point the demo uses: an in-memory model, local YAML tasks, no hub."""
    import datasets

    from ratplus.eval.harness import evaluate_harness

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    mc_yaml = _tasks(tmp_path)[0]
    em = EvalModel(make_model(tokenizer), tokenizer, {"adapted_pattern": "D4"}, label="in-memory")
    res = evaluate_harness(em, [str(mc_yaml)], pattern="D4-W0-P0", include_defaults=False, batch_size=4)
    assert res["ratplus"] == {"model": "in-memory", "pattern": "D4-W0-P0", "status": "adapted"}
    lm = RATPlusHarnessLM(model=em, pattern="D4")
    docs = [json.loads(x) for x in (tmp_path / "mc.jsonl").read_text().splitlines()]
    correct = 0
    for d in docs:
        scores = lm.loglikelihood([_req("loglikelihood", d["question"], " " + c) for c in d["choices"]], True)
        correct += max(range(3), key=lambda i: scores[i][0]) == d["label"]
    assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(docs))
    with pytest.raises(FileNotFoundError, match="lm-eval task file not found"):
        evaluate_harness(em, [str(tmp_path / "missing.yaml")])

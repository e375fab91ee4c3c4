"""lm-eval's own API clients against a live ``ratplus serve``: ``local-completions`` (a loglikelihood
task through echo + logprobs, and a generate_until task) and ``local-chat-completions``
(generate_until) give the same per-sample answers and scores as ``ratplus eval lm-eval``'s direct
model on the same weights and pattern. Tasks are local JSONL files (no internet).

lm-eval's client runs with its defaults: ``tokenized_requests=True`` (prompts sent as lists of
token ids), ``batch_size=2`` (two prompts per request, one choice each with its index),
``tokenizer_backend="huggingface"`` (``AutoTokenizer`` on the model folder). The chat server is
given a template that renders the user message as it is, so the chat prompt is the task's context
and the direct run is the reference for it too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

for _name in ("fastapi", "uvicorn", "openai", "lm_eval"):
    pytest.importorskip(_name)

from ratplus.eval.common import EvalModel  # noqa: E402
from ratplus.eval.harness import evaluate_harness  # noqa: E402
from tests.serve.conftest import D16, NAME, live_server  # noqa: E402

IDENTITY_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _tasks(folder: Path) -> dict[str, Path]:
    rows = {
        "mc": [
            {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
            {"question": "The quick brown", "choices": ["fox", "dog", "cat"], "label": 0},
            {"question": "Once upon a", "choices": ["time", "model", "question"], "label": 0},
            {"question": "To be, or not to", "choices": ["be", "see", "run"], "label": 0},
            {"question": "def add(a,", "choices": ["b):", "c):", "x"], "label": 0},
        ],
        "gen": [
            {"prompt": "Once upon a time there", "answer": " was"},
            {"prompt": "The quick brown fox", "answer": " jumps"},
            {"prompt": "To be, or not to be,", "answer": " that"},
        ],
    }
    specs = {
        "mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n",
        "gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n",
    }
    paths = {}
    for name, docs in rows.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        yaml = folder / f"srv_{name}.yaml"
        yaml.write_text(
            f"task: srv_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{specs[name]}metadata:\n  version: 1.0\n"
        )
        paths[name] = yaml
    return paths


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    return _tasks(tmp_path)


def _samples(results: dict, task: str) -> dict[int, dict]:
    return {s["doc_id"]: s for s in results["samples"][task]}


def _through_server(url: str, ckpt: Path, tasks: list[str], chat: bool) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    route = "chat/completions" if chat else "completions"
    args = {"model": f"{NAME}:{D16}", "base_url": f"{url}/v1/{route}", "max_retries": 1}
    if not chat:
        args |= {"tokenizer": str(ckpt), "tokenizer_backend": "huggingface"}
    return simple_evaluate(
        model="local-chat-completions" if chat else "local-completions",
        model_args=args,
        tasks=[str(t) for t in tasks],
        batch_size=1 if chat else 2,
        apply_chat_template=chat,
        task_manager=TaskManager(include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )


def test_lm_eval_api_clients_equal_the_direct_run(model, tokenizer, ckpt, offline):
    direct = evaluate_harness(
        EvalModel(model, tokenizer, label=NAME),
        [str(offline["mc"]), str(offline["gen"])],
        pattern=D16,
        include_defaults=False,
        log_samples=True,
        batch_size=2,
    )
    with live_server(model, tokenizer, patterns=(D16,), chat_template=IDENTITY_TEMPLATE) as live:
        served = _through_server(live.url, ckpt, [offline["mc"], offline["gen"]], chat=False)
        chat = _through_server(live.url, ckpt, [offline["gen"]], chat=True)
    # loglikelihood: every (sum of logprobs, is greedy) pair, then the metric
    want, got = _samples(direct, "srv_mc"), _samples(served, "srv_mc")
    assert sorted(want) == sorted(got) == list(range(5))
    for i in want:
        w = [r[0] for r in want[i]["resps"]]
        g = [r[0] for r in got[i]["resps"]]
        assert [float(x[0]) for x in g] == pytest.approx([float(x[0]) for x in w], abs=1e-4)
        assert [bool(x[1]) for x in g] == [bool(x[1]) for x in w]
    assert served["results"]["srv_mc"]["acc,none"] == direct["results"]["srv_mc"]["acc,none"]
    # generate_until: the same texts through completions (token-id prompts, batches of two) and chat
    want = _samples(direct, "srv_gen")
    assert any(s["filtered_resps"][0] for s in want.values()), "the test needs non-empty generations"
    for run in (served, chat):
        got = _samples(run, "srv_gen")
        assert [got[i]["filtered_resps"] for i in sorted(got)] == [want[i]["filtered_resps"] for i in sorted(want)]
        assert run["results"]["srv_gen"]["exact_match,none"] == direct["results"]["srv_gen"]["exact_match,none"]


def test_lm_eval_own_models_stay_registered_next_to_ratplus():
    """`ratplus eval lm-eval --model local-completions`: the wrapper registers "ratplus" first, and
    lm-eval fills its registry only while it is empty (a fresh process: nothing imported before)."""
    import subprocess
    import sys

    code = (
        "import ratplus.eval.harness\n"
        "from lm_eval.api.registry import get_model\n"
        "print(get_model('local-completions').__name__, get_model('ratplus').__name__)"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["LocalCompletionsAPI", "RATPlusHarnessLM"], out.stderr[-2000:]

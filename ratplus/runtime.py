"""What every command that runs a model shares: device and dtype from a flag, the environment
record (device, torch, git SHA, dtype), a plain-text table, and JSON / JSON-lines output.

Used by bench, eval and train; it knows nothing of models."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    return {
        "device": name,
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "dtype": str(dtype).removeprefix("torch."),
    }


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def emit_json(record: dict[str, Any], path: str | None = None) -> None:
    """The last line of every benchmark: one JSON object."""
    line = json.dumps(record, sort_keys=True)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(line + "\n")
    print(line)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} requested (--device) but CUDA is not available")
    return dev


#: dtype names a ``--dtype`` flag accepts.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """A dtype from its name; ``auto``: bfloat16 on CUDA, float32 elsewhere (needs ``device``)."""
    if name == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def write_json(path: str | Path, record: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return p


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p


def parse_jsonl(text: str, source: str | Path, sep: str = " line ") -> list[tuple[str, Any]]:
    """(where, record) for every non-blank line of JSON-lines ``text``; ``where`` names the place as
    ``<source><sep><line number>`` for the caller's own messages. A line that is not JSON raises
    ValueError naming its place."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}{sep}{lineno}"
        try:
            out.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a line that is not a JSON object raises ValueError naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"JSONL file not found: {p}")
    records = []
    for where, rec in parse_jsonl(p.read_text(encoding="utf-8"), p):
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records

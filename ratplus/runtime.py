"""What every command that runs a model shares: device and dtype from a flag, the environment
record (device, torch, git SHA, dtype), a plain-text table, and JSON / JSON-lines output.

Also the one way every writer of the project writes: ``atomic_write_bytes`` / ``atomic_write_text``
(temporary name, fsync, rename) and ``writing``, which turns an OSError during a write (disk full,
permissions, a file where a folder should be) into a ``WriteError`` naming the path and the space
needed, after removing the writer's own partial files.

Used by bench, eval and train; it knows nothing of models."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
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
        make_dir(Path(path).parent)
        atomic_write_text(path, line + "\n")
    print(line)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {name!r} (--device): expected auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"device {name!r} (--device) is not supported: expected auto, cpu, cuda or cuda:N")
    cuda = torch.cuda.is_available()
    if dev.type == "cuda" and dev.index is not None and cuda and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name} (--device) requested but only {torch.cuda.device_count()} GPU(s) exist")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} requested (--device) but CUDA is not available")
    return dev


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes a new allocation can take now on ``device``: the free GPU memory (``mem_get_info``), or on
    the CPU the kernel's ``MemAvailable`` (free RAM plus reclaimable cache, the figure the OOM killer's
    headroom follows), capped by a cgroup memory limit when one is set. None when unknown."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            avail = min(avail, max(int(limit) - usage, 0))
        break
    return avail


def check_fits_memory(nbytes: int, what: str, device: torch.device | str = "cpu") -> None:
    """ValueError when ``nbytes`` exceed the memory *available* now on ``device`` (``available_memory``):
    such a request would end in an allocation failure or the OOM killer, not in a clear error."""
    device = torch.device(device)
    avail = available_memory(device)
    if avail is not None and nbytes > avail:
        raise ValueError(
            f"{what} needs {nbytes / 2**30:.2f} GiB, more than the {avail / 2**30:.2f} GiB available on {device}"
        )


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


# ---- writing -----------------------------------------------------------------------------------------


class WriteError(OSError):
    """A write that failed; the message names the path, the reason and (disk full) the space needed."""


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def remove_path(path: Path) -> None:
    """Delete a file or folder if it exists (partial output), ignoring errors."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            path.unlink()


@contextmanager
def writing(target: str | Path, partial: Iterable[str | Path] = (), needed: int | None = None) -> Iterator[None]:
    """Run a write of ``target``: an OSError inside removes the ``partial`` paths (the writer's own
    temporary files or folders, never earlier results) and becomes a ``WriteError`` naming
    ``target``, the reason and, when the disk is full, the free space and ``needed`` bytes."""
    target = Path(target)
    try:
        yield
    except OSError as e:
        for p in partial:
            remove_path(Path(p))
        if isinstance(e, WriteError):
            raise
        reason = e.strerror or str(e)
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(target) else ""
        msg = f"cannot write {target}: {reason}{where}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = _free_bytes(target.parent)
            msg += f"; {_size(free) if free is not None else 'no'} free on that disk"
            if needed is not None:
                msg += f", about {_size(needed)} needed"
        msg += "; partial files were removed, earlier results are intact: fix this and run the command again"
        error = WriteError(msg)
        error.errno = e.errno
        raise error from e


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` under a temporary name, fsync and rename: a crash or a full disk never leaves
    a half-written ``path`` (an older one stays as it was)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, partial=[tmp], needed=len(data)):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_dir(path: str | Path) -> Path:
    """``path`` can be (or become) a folder: a file standing there raises ValueError naming it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{p} is a file; a folder is expected there")
    return p


def make_dir(path: str | Path) -> Path:
    """``mkdir -p`` with a clear error when a file stands where the folder should be."""
    p = check_dir(path)
    with writing(p):
        p.mkdir(parents=True, exist_ok=True)
    return p


def write_json(path: str | Path, record: Any) -> Path:
    p = Path(path)
    make_dir(p.parent)
    atomic_write_text(p, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return p


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p} is a folder; give a .jsonl file path")
    make_dir(p.parent)
    atomic_write_text(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
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

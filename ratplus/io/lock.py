"""One writer per output folder: ``<out>/.ratplus.lock`` holds the owner's pid, host and command.

``folder_lock(out, what)`` takes the lock for the body of a ``with`` block (train, adapt, sft, demo).
A second run on the same folder fails at once with ``LockError`` naming the owner. A lock left by a
process that no longer exists on this host (killed, crashed) is taken over with a warning; a lock
from another host is never taken over (its process cannot be checked from here).

The lock file is created complete (written under a private name, then hard-linked into place, which
fails if the lock exists), so no reader ever sees a half-written lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ratplus.runtime import make_dir, writing

logger = logging.getLogger("ratplus")

LOCK_FILE = ".ratplus.lock"


class LockError(ValueError):
    """The output folder is in use by another live run."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _stale(owner: dict | None) -> bool:
    if owner is None:  # unreadable: written by no ratplus version; treat as left over
        return True
    return owner.get("host") == socket.gethostname() and not pid_alive(owner["pid"])


def acquire(folder: str | Path, what: str) -> Path:
    """Take ``folder``'s lock for ``what`` (e.g. ``train``); returns the lock path. Raises ``LockError``."""
    folder = make_dir(folder)
    lock = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": what, "started": time.time()}
    mine = folder / f"{LOCK_FILE}.{os.getpid()}"
    with writing(lock, partial=[mine]):
        mine.write_text(json.dumps(me) + "\n")
        try:
            for _ in range(3):
                try:
                    os.link(mine, lock)
                    return lock
                except FileExistsError:
                    owner = _read(lock)
                    if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == me["host"]:
                        raise LockError(
                            f"{folder} is already locked by this process ({owner.get('command')})"
                        ) from None
                    if not _stale(owner):
                        raise LockError(
                            f"{folder} is in use by another run ({owner.get('command')}, pid {owner['pid']} on "
                            f"{owner.get('host')}; lock file {lock}): one writer per output folder. Wait for it, "
                            "choose another --out, or delete the lock file if that run is gone"
                        ) from None
                    logger.warning(
                        "ratplus: warning: taking over the stale lock %s (%s)",
                        lock,
                        "unreadable" if owner is None else f"pid {owner['pid']} on {owner.get('host')} is gone",
                    )
                    with suppress(FileNotFoundError):
                        lock.unlink()
            raise LockError(f"could not take the lock {lock}: other runs keep taking it")
        finally:
            mine.unlink(missing_ok=True)


def release(lock: Path) -> None:
    """Remove the lock if this process still owns it."""
    owner = _read(lock)
    if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold ``folder``'s lock for the body of the block (see module docstring). A folder created
    here that is still empty at the end (the run stopped on bad input) is removed again."""
    created = not Path(folder).exists()
    lock = acquire(folder, what)
    try:
        yield lock
    finally:
        release(lock)
        if created:
            with suppress(OSError):  # not empty: the run wrote something, keep it
                lock.parent.rmdir()

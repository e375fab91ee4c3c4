"""Training checkpoints: atomic, checksummed, resumable bit for bit.

A checkpoint is a folder ``<out>/checkpoints/step_0000100/`` holding

  config.json, model.safetensors, tokenizer.json, metadata.json   a model folder (``ratplus.io.folder``)
  trainer_state.safetensors    optimizer moments (``optim/<param name>/<key>``), RNG states
  trainer_state.json           step, tokens seen, data position, scheduler, optimizer hyper-parameters,
                               Python / NumPy RNG state
  train_config.json            the resolved training configuration
  manifest.json                size and SHA-256 of every file above, written last

No pickle: tensors go to safetensors, the rest to JSON. The folder is written under a hidden
temporary name and renamed into place only once the manifest is on disk, so a crash (even SIGKILL)
mid-write leaves either the previous state or a complete checkpoint, never a half-written one that
loads. Loading checks every file against the manifest, so a truncated or tampered file is refused
with ``CheckpointError`` naming the file. Final model folders are written the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ratplus.config import ModelConfig
from ratplus.io.folder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    atomic_write_bytes,
    atomic_write_text,
    load_config,
    load_state_dict_file,
    replace_dir,
    save_pretrained,
    with_tied_keys,
)
from ratplus.model.rat import RATPlusLM

logger = logging.getLogger("ratplus")

FORMAT = "ratplus-checkpoint"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_state.safetensors"
TRAIN_CONFIG_FILE = "train_config.json"
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint or model folder that is incomplete, truncated or modified."""


# ---- manifest --------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE
    }
    atomic_write_text(folder / MANIFEST_FILE, json.dumps({"format": FORMAT, "version": 1, "files": files}, indent=2))


def verify_folder(path: str | Path) -> None:
    """Check every file of a checkpoint / model folder against its manifest.

    Raises FileNotFoundError when the folder does not exist and ``CheckpointError`` (a ValueError)
    when the manifest is missing or a file is missing, truncated or different."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {folder}")
    mpath = folder / MANIFEST_FILE
    if not mpath.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST_FILE}: it is incomplete or not a ratplus checkpoint")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath} is damaged ({e}); the checkpoint cannot be trusted") from e
    for name, entry in files.items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file missing: {f}")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"checkpoint file {f} has {size} bytes but the manifest says {entry['bytes']}: it is truncated or was "
                "overwritten; refusing to load it"
            )
        if _sha256(f) != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint file {f} does not match its SHA-256 in {MANIFEST_FILE}: it was modified or is corrupt; "
                "refusing to load it"
            )


# ---- atomic folders --------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place (an older folder of the same name is swapped out)."""
    _write_manifest(tmp)
    _fsync_dir(tmp)
    replace_dir(tmp, final)
    _fsync_dir(final.parent)


def write_model_folder(
    path: str | Path,
    config: ModelConfig,
    model_state: dict[str, torch.Tensor],
    tokenizer: Any = None,
    metadata: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Atomically write a model folder (``save_pretrained`` format) plus ``extra_files`` and a manifest.

    ``model_state``: full CPU weights keyed by parameter name (e.g. ``distributed.full_model_state``)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # A weightless (meta) model adopts the given tensors, so the format is exactly save_pretrained's.
    with torch.device("meta"):
        shell = RATPlusLM(config)
    shell.load_state_dict(with_tied_keys(config, model_state), strict=True, assign=True)
    save_pretrained(shell, tmp, tokenizer=tokenizer, metadata=metadata)
    for name, data in (extra_files or {}).items():
        atomic_write_bytes(tmp / name, data)
    _publish(tmp, final)
    return final


# ---- training checkpoints ----------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python, NumPy, torch (and CUDA) RNG states as (JSON part, tensor part)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [version, list(mt), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    tensors = {"rng/torch": torch.get_rng_state(), "rng/numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    return js, tensors


def set_rng_state(js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, mt, gauss = js["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _flatten_optimizer(state: dict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors, extra = {}, {}
    for name, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                extra.setdefault(name, {})[key] = value
    return {"param_groups": state["param_groups"], "extra": extra}, tensors


def _unflatten_optimizer(js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for flat, value in tensors.items():
        if flat.startswith("optim/"):
            name, key = flat[len("optim/") :].rsplit("/", 1)
            state.setdefault(name, {})[key] = value
    for name, entries in js["extra"].items():
        state.setdefault(name, {}).update(entries)
    return {"state": state, "param_groups": js["param_groups"]}


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def save_checkpoint(
    root: str | Path,
    step: int,
    config: ModelConfig,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    trainer_state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    train_config: dict[str, Any],
    tokenizer: Any = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``<root>/step_XXXXXXX`` atomically (see module docstring). ``trainer_state`` must be
    JSON-serialisable; ``tensors`` (data generator, RNG) join the optimizer tensors in safetensors."""
    from safetensors.torch import save

    opt_js, opt_tensors = _flatten_optimizer(optimizer_state)
    clash = set(opt_tensors) & set(tensors)
    if clash:
        raise ValueError(f"trainer tensors clash with optimizer tensors: {sorted(clash)[:3]}")
    state_js = {**trainer_state, "step": step, "optimizer": opt_js}
    extra = {
        TENSORS_FILE: save({**opt_tensors, **tensors}, metadata={"format": "pt"}),
        STATE_FILE: (json.dumps(state_js, indent=1) + "\n").encode(),
        TRAIN_CONFIG_FILE: (json.dumps(train_config, indent=2, sort_keys=True) + "\n").encode(),
    }
    return write_model_folder(checkpoint_dir(root, step), config, model_state, tokenizer, metadata, extra)


@dataclass
class Checkpoint:
    path: Path
    step: int
    config: ModelConfig
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    trainer_state: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    train_config: dict[str, Any]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Verify and read a training checkpoint folder (raises ``CheckpointError`` if damaged)."""
    from safetensors.torch import load

    folder = Path(path)
    verify_folder(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, TENSORS_FILE, TRAIN_CONFIG_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is a model folder, not a training checkpoint (no {name})")
    config = load_config(folder)
    state_js = json.loads((folder / STATE_FILE).read_text())
    tensors = load((folder / TENSORS_FILE).read_bytes())
    optimizer_state = _unflatten_optimizer(state_js.pop("optimizer"), tensors)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("optim/")}
    return Checkpoint(
        path=folder,
        step=int(state_js["step"]),
        config=config,
        model_state=with_tied_keys(config, load_state_dict_file(folder / WEIGHTS_FILE)),
        optimizer_state=optimizer_state,
        trainer_state=state_js,
        tensors=tensors,
        train_config=json.loads((folder / TRAIN_CONFIG_FILE).read_text()),
    )


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Published checkpoint folders under ``root``, oldest first (temporary folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; damaged ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_folder(path)
            return path
        except CheckpointError as e:
            logger.warning("ratplus: skipping damaged checkpoint: %s", e)
    return None


def remove_leftovers(root: str | Path) -> None:
    """Delete the hidden temporary folders an interrupted write leaves under ``root``."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` (>= 1) newest checkpoints under ``root``."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    for _, path in list_checkpoints(root)[:-keep_last]:
        # Renamed out of sight first: a kill during the deletion leaves a hidden leftover (removed
        # on the next start), never a half-deleted folder that looks like a damaged checkpoint.
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

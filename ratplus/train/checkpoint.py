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
    load_config,
    load_state_dict_file,
    replace_dir,
    save_pretrained,
    with_tied_keys,
)
from ratplus.io.lock import pid_alive
from ratplus.io.manifest import FolderError, verify_folder, write_manifest
from ratplus.model.rat import RATPlusLM
from ratplus.runtime import atomic_write_bytes, writing

logger = logging.getLogger("ratplus")

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_state.safetensors"
TRAIN_CONFIG_FILE = "train_config.json"
_STEP_DIR = re.compile(r"step_(\d+)")


#: A checkpoint or model folder that is incomplete, truncated or modified (``ratplus.io.manifest``).
CheckpointError = FolderError


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
    write_manifest(tmp)
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
    model_files: dict[str, str] | None = None,
) -> Path:
    """Atomically write a model folder (``save_pretrained`` format) plus ``extra_files`` and a manifest.

    ``model_state``: full CPU weights keyed by parameter name (e.g. ``distributed.full_model_state``).
    ``model_files``: text files that belong to the model (``tokenizer_config.json`` with a chat template)."""
    final = Path(path)
    tmp = _tmp_name(final)
    needed = sum(v.numel() * v.element_size() for v in model_state.values()) * 2  # weights + optimizer, roughly
    # A full disk (or any write error) removes the temporary folder; the previous checkpoints stay.
    with writing(final, partial=[tmp], needed=needed):
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        # A weightless (meta) model adopts the given tensors, so the format is exactly save_pretrained's.
        with torch.device("meta"):
            shell = RATPlusLM(config)
        shell.load_state_dict(with_tied_keys(config, model_state), strict=True, assign=True)
        save_pretrained(shell, tmp, tokenizer=tokenizer, metadata=metadata, extra_files=model_files)
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
    model_files: dict[str, str] | None = None,
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
    return write_model_folder(checkpoint_dir(root, step), config, model_state, tokenizer, metadata, extra, model_files)


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


def verify_checkpoint(path: str | Path) -> Path:
    """``path`` checked against its manifest and for every file of a training checkpoint (what
    ``load_checkpoint`` checks before reading anything)."""
    folder = Path(path)
    verify_folder(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, TENSORS_FILE, TRAIN_CONFIG_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is a model folder, not a training checkpoint (no {name})")
    return folder


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Verify and read a training checkpoint folder (raises ``CheckpointError`` if damaged)."""
    from safetensors.torch import load

    folder = verify_checkpoint(path)
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


def _is_valid(path: Path) -> bool:
    try:
        verify_folder(path, "size")  # sizes only: pruning runs at every save and must stay cheap
        return True
    except FolderError:
        return False


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; damaged ones are skipped with a warning.

    None when there is no checkpoint at all. When there are checkpoints but every one is damaged,
    raises ``CheckpointError`` listing them: resuming must never silently start from scratch."""
    found = list_checkpoints(root)
    problems = []
    for _, path in reversed(found):
        try:
            verify_folder(path)
            return path
        except FolderError as e:
            logger.warning("ratplus: skipping damaged checkpoint: %s", e)
            problems.append(str(e))
    if found:
        raise CheckpointError(
            f"every checkpoint under {root} is damaged, refusing to start from scratch over them: "
            + " | ".join(problems)
            + " (move them away, or point --resume at a good checkpoint)"
        )
    return None


def _leftover_pid(name: str) -> int | None:
    m = re.search(r"\.(?:tmp|old)-(\d+)$", name)
    return int(m.group(1)) if m else None


def remove_leftovers(root: str | Path, recursive: bool = False) -> None:
    """Delete the hidden temporary folders an interrupted write left under ``root``: this process's
    own and those of dead processes, never a live writer's (``ratplus.io.lock.pid_alive``).

    ``recursive``: in every folder below ``root`` too, for a whole output tree that its owner holds the
    lock of (the demo's, whose finished stages are never rerun to clean up after themselves); there the
    token shards' visible ``<name>.tmp-PID`` folders count as well."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in list(root.iterdir()):
        pid = _leftover_pid(p.name)
        own_or_dead = pid is not None and (pid == os.getpid() or not pid_alive(pid))
        if p.is_dir() and own_or_dead and (recursive or p.name.startswith(".")):
            shutil.rmtree(p, ignore_errors=True)
        elif recursive and p.is_dir() and not p.is_symlink():
            remove_leftovers(p, recursive=True)


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` (>= 1) best checkpoints under ``root``: ordered by validity
    (sizes match the manifest), then step, so a good checkpoint is never deleted to keep a damaged one."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    ranked = sorted(list_checkpoints(root), key=lambda sp: (_is_valid(sp[1]), sp[0]))
    for _, path in ranked[:-keep_last]:
        # Renamed out of sight first: a kill during the deletion leaves a hidden leftover (removed
        # on the next start), never a half-deleted folder that looks like a damaged checkpoint.
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

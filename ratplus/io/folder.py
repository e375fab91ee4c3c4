"""Saving and loading a model folder (the native checkpoint format). ``load_metadata`` (the dict of
``metadata.json``) is re-exported from ``ratplus.io.metadata``.

A model folder holds:
  config.json        the ``ModelConfig`` as a dict
  model.safetensors  the weights (tied head stored once, under ``embedding.wte.weight``)
  tokenizer.json     a Hugging Face ``tokenizers`` file, when the model was trained with one
  metadata.json      what training/conversion knows (``ratplus.io.metadata``), optional
  manifest.json      size and SHA-256 of the files above, written last (``ratplus.io.manifest``)

Files are written to a temporary name and renamed, so an interrupted save never leaves a file
that loads wrong. Loading first checks the files against the manifest (a folder without one, from
another tool, loads with a note), then keys and shapes, and refuses anything that does not match.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ratplus.config import ModelConfig
from ratplus.io.manifest import verify_folder, write_manifest
from ratplus.io.metadata import METADATA_FILE, ModelMetadata, metadata_json
from ratplus.io.metadata import load_metadata as load_metadata  # re-exported: folder readers import it from here
from ratplus.io.tokenizer import TOKENIZER_FILE, folder_tokenizer
from ratplus.model.rat import RATPlusLM
from ratplus.runtime import atomic_write_bytes, atomic_write_text, check_fits_memory, make_dir

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: The tied pair: with ``tie_embeddings`` the head is the embedding, stored once under EMBED_KEY.
EMBED_KEY = "embedding.wte.weight"
HEAD_KEY = "head.lm_head.weight"


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final`` by renames, so that ``final`` is never half
    written; an older folder at ``final`` is renamed aside first and removed after."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def model_state_for_saving(model: RATPlusLM) -> dict[str, torch.Tensor]:
    """State dict with the tied head dropped (safetensors refuses shared storage)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop(HEAD_KEY, None)
    return state


def save_pretrained(
    model: RATPlusLM,
    path: str | Path,
    tokenizer: Any = None,
    metadata: ModelMetadata | dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a model folder (see module docstring). ``tokenizer``: a ``tokenizers.Tokenizer`` or None.
    ``extra_files``: more text files by name (an imported model's ``tokenizer_config.json``).
    The manifest covers the files written here (other files already in the folder stay unlisted)."""
    from safetensors.torch import save

    out = make_dir(path)
    atomic_write_bytes(out / WEIGHTS_FILE, save(model_state_for_saving(model), metadata={"format": "pt"}))
    atomic_write_text(out / CONFIG_FILE, json.dumps(model.config.to_dict(), indent=2) + "\n")
    written = [WEIGHTS_FILE, CONFIG_FILE]
    if tokenizer is not None:
        atomic_write_text(out / TOKENIZER_FILE, tokenizer.to_str())
        written.append(TOKENIZER_FILE)
    if metadata is not None:
        atomic_write_text(out / METADATA_FILE, metadata_json(metadata))
        written.append(METADATA_FILE)
    for name, text in (extra_files or {}).items():
        atomic_write_text(out / name, text)
        written.append(name)
    write_manifest(out, written)
    return out


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or corrupt file raises ValueError naming it."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises several types for damaged files
        raise ValueError(f"cannot read weights {p}: the file is truncated or corrupt ({e})") from e


def state_dict_problems(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], optional: set[str] = frozenset()
) -> list[str]:
    """What keeps ``found`` (key -> shape) from loading as ``expected``: missing keys (``optional``
    ones excepted), unexpected keys and shape mismatches, each a short line; empty when it fits."""

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")

    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    shared = sorted(set(found) & set(expected))
    bad = [f"{k}: {found[k]} vs {expected[k]}" for k in shared if found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listed(unexpected)}")
    if bad:
        problems.append(f"shape mismatches (checkpoint vs model): {'; '.join(bad[:8])}")
    return problems


def load_into(model: RATPlusLM, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Strict load with a clear message: missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    state = with_tied_keys(model.config, state)
    problems = state_dict_problems(
        {k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in state.items()}
    )
    if problems:
        raise ValueError(f"{source} does not match the model config: " + " | ".join(problems))
    model.load_state_dict(state, strict=True)


def with_tied_keys(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with the tied LM head present (the model folder stores it once)."""
    if config.tie_embeddings and HEAD_KEY not in state and EMBED_KEY in state:
        state = {**state, HEAD_KEY: state[EMBED_KEY]}
    return state


def check_model_folder(path: str | Path) -> Path:
    """``path`` as a native model folder, or a clear error for what it is instead: missing, a file, a
    training run folder (its model is ``final/``), or a Hugging Face folder (``config.json`` with a
    ``model_type``), each with the command that gets the user to a model folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; a model folder (config.json, model.safetensors) is expected")
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    config = folder / CONFIG_FILE
    if not config.is_file():
        if (folder / "final" / CONFIG_FILE).is_file():
            final = folder / "final"
            raise ValueError(f"{folder} is a training run folder, not a model folder: its trained model is {final}")
        if (folder / "checkpoints").is_dir():
            raise ValueError(
                f"{folder} is a training run folder without a final model yet: pass one of its checkpoints "
                f"({folder}/checkpoints/step_*) or finish the run (ratplus train ... --resume)"
            )
        raise FileNotFoundError(f"model config not found: {config} ({folder} is not a ratplus model folder)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError):
        model_type = None  # ModelConfig.load reports a malformed file with its own message
    if model_type is not None:
        hint = f"ratplus convert {folder} {folder}-native --to native" if model_type == "ratplus" else ""
        raise ValueError(
            f"{folder} is a Hugging Face folder (model_type {model_type!r}), not a native ratplus model folder"
            + (f": load it with transformers (AutoModelForCausalLM), or convert it: {hint}" if hint else "")
        )
    return folder


def load_config(path: str | Path) -> ModelConfig:
    return ModelConfig.load(check_model_folder(path) / CONFIG_FILE)


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: str | None = None
) -> RATPlusLM:
    """Verify the folder against its manifest (``verify``: ``sha256`` | ``size``, default
    ``$RATPLUS_VERIFY`` or ``sha256``; see ``ratplus.io.manifest``), build the model from
    ``config.json`` and load ``model.safetensors``; returns it in eval mode."""
    folder = check_model_folder(path)  # before the manifest note: say what the folder is instead
    verify_folder(folder, verify, require=False)
    config = load_config(folder)
    check_fits_memory(4 * config.num_params(), f"the {config.num_params():,}-parameter model in {folder}")
    model = RATPlusLM(config)
    load_into(model, load_state_dict_file(folder / WEIGHTS_FILE), source=str(folder / WEIGHTS_FILE))
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


def load_tokenizer(path: str | Path) -> Any:
    """The folder's ``tokenizers.Tokenizer``, or None when it has no tokenizer.json."""
    return folder_tokenizer(path)

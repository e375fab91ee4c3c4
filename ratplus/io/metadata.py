"""``metadata.json`` of a model folder: what training or conversion knows about the weights.

One dataclass, written by the trainer (every field, ``None`` where it does not apply) and by
``convert`` (only ``adapted_pattern``), and read by evaluation, the Hugging Face wrapper and
``ratplus generate``. The file stays a flat JSON object with sorted keys; a key this class does not
know is kept in ``extra`` and written back unchanged.

The pattern facts:
  adapted_pattern  the pattern(s) the weights were resolution-adapted to (string or list)
  sparse_pattern   the sparse branch of joint pretraining (set when ``joint_train`` is true); older
                   demo folders call it ``joint_pattern``, read here as the same thing
  default_pattern  the pattern to run when none is asked for (``ratplus tune-pattern --record``
                   writes its choice here, with its measured figures in ``tuned``)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratplus.config import read_json

METADATA_FILE = "metadata.json"
_LEGACY_JOINT = "joint_pattern"


@dataclass
class ModelMetadata:
    task: str | None = None  # pretrain, adapt or sft
    adapted_pattern: str | list[str] | None = None
    joint_train: bool | None = None
    sparse_pattern: str | None = None
    train_pattern: str | None = None  # the pattern of the last training step
    tokens_seen: int | None = None
    steps: int | None = None
    peak_lr: float | None = None
    seq_len: int | None = None
    data: str | None = None  # the training data folder, as resolved
    val_loss: dict[str, float] | None = None  # pattern -> held-out loss at the end
    init_from: str | None = None
    init_tokens_seen: int | None = None
    default_pattern: str | None = None
    tuned: dict[str, Any] | None = None  # how default_pattern was chosen: budget, calibration PPL, KV bytes
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        if not isinstance(data, dict):
            raise ValueError(f"model metadata must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**values, extra=extra)

    def to_dict(self, drop_none: bool = False) -> dict[str, Any]:
        """The flat JSON object; ``drop_none`` leaves out the fields that were not set."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if drop_none:
            out = {k: v for k, v in out.items() if v is not None}
        return {**out, **self.extra}

    @property
    def adapted_patterns(self) -> list[Any]:
        """The adapted pattern spec(s), as recorded (a string or a list in the file)."""
        return _as_list(self.adapted_pattern)

    @property
    def joint_patterns(self) -> list[Any]:
        """The sparse pattern(s) of joint pretraining: ``sparse_pattern`` when ``joint_train`` is not
        false, and a legacy ``joint_pattern`` entry."""
        found = _as_list(self.sparse_pattern) if self.joint_train is not False else []
        return found + [p for p in _as_list(self.extra.get(_LEGACY_JOINT)) if p not in found]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def as_metadata(value: ModelMetadata | dict[str, Any] | None) -> ModelMetadata:
    """A ``ModelMetadata`` from itself, a dict (as in the file) or None (nothing known)."""
    if isinstance(value, ModelMetadata):
        return value
    return ModelMetadata.from_dict(value or {})


def load_metadata(folder: str | Path) -> dict[str, Any]:
    """The folder's ``metadata.json`` as a dict ({} when there is none); bad JSON raises ValueError."""
    p = Path(folder) / METADATA_FILE
    if not p.is_file():
        return {}
    return read_json(p, "metadata")


def read_metadata(folder: str | Path) -> ModelMetadata:
    """The folder's metadata (every field None when it has no ``metadata.json``)."""
    return ModelMetadata.from_dict(load_metadata(folder))


def metadata_json(metadata: ModelMetadata | dict[str, Any]) -> str:
    """The text of ``metadata.json``: indented, keys sorted."""
    record = metadata.to_dict() if isinstance(metadata, ModelMetadata) else metadata
    return json.dumps(record, indent=2, sort_keys=True) + "\n"

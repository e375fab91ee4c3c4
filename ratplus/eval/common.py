"""What every evaluator shares: loading a checkpoint read-only, tokenizer helpers, whether a
checkpoint was adapted to the pattern being evaluated, and the attention-FLOP / KV-cache cost of a
pattern (the x axis of the perplexity plot).

Evaluation never writes into a model folder: results go to the output folder the caller names.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ratplus.config import AttentionPattern, ModelConfig, PatternSpec
from ratplus.io.folder import load_metadata, load_pretrained, load_tokenizer
from ratplus.io.metadata import ModelMetadata, as_metadata
from ratplus.io.tokenizer import find_eos_id
from ratplus.model.rat import RATPlusLM

logger = logging.getLogger("ratplus")


@dataclass
class EvalModel:
    """A checkpoint opened for evaluation: model (eval mode), tokenizer, metadata, where it came from."""

    model: RATPlusLM
    tokenizer: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    label: str | None = None  # name in tables and plots (default: run_label of the folder)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return run_label(self.path) if self.path is not None else "model"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_id(self) -> int | None:
        return eos_token_id(self.config, self.tokenizer)

    def require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            where = f"model folder {self.path}" if self.path is not None else "the model"
            raise ValueError(f"{what} needs a tokenizer, but {where} has no tokenizer.json")
        return self.tokenizer

    def status(self, pattern: PatternSpec) -> str:
        return adaptation_status(self.metadata, self.config, pattern)


def run_label(folder: str | Path) -> str:
    """A model folder's name in tables and plots: the folder's own name, except a run's ``final`` folder,
    named by its run (``runs/tiny/final`` -> ``tiny``), and an adaptation's inside a run by both
    (``runs/tiny/final-adapt-D16-W0-P0/final`` -> ``tiny-adapt-D16-W0-P0``), so two folders of one run
    get two names. Links are not followed: the demo's ``demo_out/models/ratplus`` is ``ratplus``."""
    path = Path(os.path.abspath(folder))  # absolute for the parents of a relative "final"; links kept
    if path.name != "final" or not path.parent.name:
        return path.name
    run = path.parent
    if run.name.startswith("final-") and run.parent.name:  # trainer.adapt's default out_dir: <run>/final-adapt-<p>
        return f"{run.parent.name}{run.name[len('final') :]}"
    return run.name


def open_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> EvalModel:
    """Load model, tokenizer and metadata of a model folder; nothing in the folder is modified."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    model = load_pretrained(folder, device=device, dtype=dtype)
    return EvalModel(model, load_tokenizer(folder), load_metadata(folder), folder)


def eos_token_id(config: ModelConfig, tokenizer: Any = None) -> int | None:
    """The config's ``eos_token_id``, else the tokenizer's end-of-document token (the one list of
    ``ratplus.io.tokenizer.EOS_CANDIDATES`` that training appends after every document)."""
    if config.eos_token_id is not None:
        return config.eos_token_id
    return find_eos_id(tokenizer) if tokenizer is not None else None


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens (HF ``tokenizers.Tokenizer``)."""
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


# ---- was the checkpoint adapted to this pattern? -----------------------------------------------


def adaptation_status(metadata: ModelMetadata | dict[str, Any], config: ModelConfig, pattern: PatternSpec) -> str:
    """``"dense"``, ``"adapted"``, ``"joint-trained"`` or ``"not adapted (...)"`` for a pattern.

    Reads the model folder's metadata (``ratplus.io.metadata``): ``adapted_pattern`` (string or list)
    is the pattern(s) the checkpoint was resolution-adapted to, ``sparse_pattern`` of a joint
    pretraining run (or a legacy ``joint_pattern``) its sparse branch. A pattern that is neither still
    evaluates; the status says it was not adapted.
    """
    meta = as_metadata(metadata)
    target = config.canonical_pattern(pattern)
    if all(layer.is_dense for layer in config.resolve_pattern(pattern)):
        return "dense"
    adapted = []
    for spec in meta.adapted_patterns:
        try:
            adapted.append(config.canonical_pattern(spec))
        except ValueError:
            logger.warning("metadata adapted_pattern %r is not a valid pattern for this model; ignored", spec)
    if target in adapted:
        return "adapted"
    for spec in meta.joint_patterns:
        try:
            if config.canonical_pattern(spec) == target:
                return "joint-trained"
        except ValueError:
            logger.warning("metadata joint pattern %r is not a valid pattern for this model; ignored", spec)
    if adapted:
        return f"not adapted (checkpoint adapted to {', '.join(adapted)})"
    return "not adapted (no adaptation recorded)"


def warn_if_not_adapted(em: EvalModel, pattern: PatternSpec) -> str:
    status = em.status(pattern)
    if status.startswith("not adapted"):
        logger.warning(
            "%s: pattern %s: checkpoint %s; results are for an unadapted model",
            em.name,
            em.config.canonical_pattern(pattern),
            status,
        )
    return status


# ---- cost of a pattern -------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _costs(config_key: str, spec_key: str, seq_len: int) -> tuple[float, float]:
    config = ModelConfig.from_dict(json.loads(config_key))
    layers = config.resolve_pattern(spec_key)
    dense_keys = seq_len * (seq_len + 1) // 2  # sum over t of (t + 1)
    per_pattern: dict[AttentionPattern, int] = {}  # layers usually repeat one pattern: count it once
    keys, slots, heads = 0.0, 0.0, 0
    for layer in layers:
        for pattern, n in layer.groups:
            if pattern not in per_pattern:
                per_pattern[pattern] = sum(pattern.keys_per_query(t) for t in range(seq_len))
            keys += n * per_pattern[pattern]
            # a window wider than the context cannot hold more than the context: cap at dense T + 1
            slots += n * min(pattern.kv_slots(seq_len), seq_len + 1)
            heads += n
    return keys / (heads * dense_keys), slots / (heads * (seq_len + 1))


def pattern_costs(config: ModelConfig, pattern: PatternSpec, seq_len: int) -> dict[str, float]:
    """Attention cost of a pattern relative to dense causal attention at context ``seq_len``.

    ``attn_flop_frac``: sum over query positions t < seq_len of |S(t)| over the dense sum, averaged
    over heads and layers (attention FLOPs scale with the number of keys each query sees).
    ``kv_frac``: decode cache slots at context ``seq_len`` (``kv_slots``) over dense seq_len + 1.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    spec = config.canonical_pattern(pattern)
    attn, kv = _costs(json.dumps(config.to_dict(), sort_keys=True), spec, seq_len)
    return {"attn_flop_frac": attn, "kv_frac": kv}

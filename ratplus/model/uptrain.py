"""Uptraining: give a dense attention model (``apply_re=False``, e.g. an imported Llama) the RAT+
recurrence without changing what it computes at the start (docs/DESIGN.md section 9).

Shapes: C model width, Hkv KV heads, K head dim (kv = Hkv x K).

The recurrence k~_t = g_t k~_{t-1} + (1 - g_t) k_t is the identity (k~ = k) when g = 0. A RAT+ layer's
gate is g = sigmoid(f) with f = W_f h (+ ``fgate_bias`` with ``gate_bias=True``): W_f = 0 and a bias of
``gate_init`` (default -12, g = 6.1e-6) make it nearly the identity for every input, so the uptrained
model's logits start within 1e-3 of the dense model's (4e-4 on SmolLM2-135M; -10 gives 3e-3).
Training then learns W_f and the bias. Their gradients pass through sigmoid'(-12) = 6e-6 and sit near
Adam's default eps (1e-8), which shrinks their steps about 50-fold; ``ratplus uptrain`` runs Adam with
eps 1e-12 so they take normal normalised steps (``ratplus.train.trainer.UPTRAIN_ADAM_EPS``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ratplus.config import ModelConfig

#: The forget-gate bias an uptrained model starts from: sigmoid(-12) = 6.1e-6 (k~ = k to that fraction).
GATE_INIT = -12.0


def recurrent_config(config: ModelConfig) -> ModelConfig:
    """The RAT+ twin of a dense config: ``apply_re`` and ``gate_bias`` on, everything else unchanged."""
    if config.apply_re:
        raise ValueError("the model already has the recurrence (apply_re=True); uptraining starts from a dense one")
    return dataclasses.replace(config, apply_re=True, gate_bias=True)


def add_recurrence(
    state: dict[str, torch.Tensor], config: ModelConfig, gate_init: float = GATE_INIT
) -> dict[str, torch.Tensor]:
    """The state dict of ``recurrent_config(config)`` that computes (almost) what the dense ``state``
    computes: each layer's in_proj gains kv zero rows for f, and ``fgate_bias`` = ``gate_init``.

    ``config`` is the dense config of ``state``. The tensors of ``state`` are shared, not copied."""
    if not (isinstance(gate_init, (int, float)) and math.isfinite(gate_init)):
        raise ValueError(f"gate_init must be a finite number (a very negative one, e.g. -12), got {gate_init!r}")
    recurrent_config(config)  # refuses a model that already has the recurrence
    out = dict(state)
    for i in range(config.num_layers):
        key = f"backbone.layers.{i}.seq_layer.in_proj.weight"
        w = state[key]  # (2C + 2 kv, C): rows o, q, k, v
        out[key] = torch.cat([w, w.new_zeros(config.kv_dim, w.shape[1])])  # + f rows: W_f = 0
        out[f"backbone.layers.{i}.seq_layer.fgate_bias"] = torch.full((config.kv_dim,), float(gate_init), dtype=w.dtype)
    return out

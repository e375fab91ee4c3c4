"""Hugging Face ``transformers`` configuration for RAT+ (``model_type = "ratplus"``).

``RATPlusConfig`` carries every field of the native ``ratplus.ModelConfig`` under the same names,
plus ``attention_pattern`` (any pattern spec in string form, e.g. ``"D16-W256-P4"``, head groups
``"D16:8+local-W64:8"`` or per-layer ``"D16/dense"``) and the usual special-token ids. Standard
``transformers`` names (``hidden_size``, ``num_hidden_layers``, ...) are aliases of the native ones;
``intermediate_size``, ``head_dim``, ``rope_theta`` and ``hidden_act`` are read-only names derived
from them (never stored in config.json, so the native fields stay the one truth).

Everything is validated when the config is built (and when the pattern is changed): a bad size or a
pattern that does not parse raises ``ValueError`` naming the field, never later inside a forward.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import PreTrainedConfig

from ratplus.config import ModelConfig, PatternSpec

# Fields shared one-to-one with ``ratplus.ModelConfig`` (``name`` is stored as ``preset``).
NATIVE_FIELDS = (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "max_seq_len",
    "rope_base",
    "apply_re",
    "tie_embeddings",
    "ffn_mult",
    "norm_eps",
    "init_std",
    "eos_token_id",
    "ffn_act",
    "ffn_dim",
    "gate_bias",
)


class RATPlusConfig(PreTrainedConfig):
    """Configuration of ``RATPlusForCausalLM``; mirrors ``ratplus.ModelConfig`` field for field.

    ``attention_pattern`` is the pattern the model runs by default (``"dense"`` = causal attention);
    ``RATPlusForCausalLM.set_attention_pattern`` switches it without reloading the weights.
    """

    model_type = "ratplus"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache", "past_key_values"]
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "num_key_value_heads": "num_kv_heads",
        "max_position_embeddings": "max_seq_len",
        "tie_word_embeddings": "tie_embeddings",
        "initializer_range": "init_std",
        "rms_norm_eps": "norm_eps",
    }

    vocab_size: int = 32000
    d_model: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int | None = None  # None = num_heads (no grouped-query attention)
    max_seq_len: int = 4096
    rope_base: float | int = 10000.0
    apply_re: bool = True
    tie_embeddings: bool = True
    ffn_mult: int = 4
    norm_eps: float = 1e-6
    init_std: float = 0.02
    ffn_act: str = "gelu"  # "swiglu" for imported Llama-family models
    ffn_dim: int | None = None  # None = ffn_mult x d_model
    gate_bias: bool = False
    attention_pattern: str = "dense"
    preset: str = "custom"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = True
    # Written by save_pretrained (the loader beside the weights, ratplus.hf.hub); always present because
    # TRL's string path reads config.auto_map of any config it cannot find in transformers.
    auto_map: dict[str, str] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        for field in ("dtype", "torch_dtype"):  # transformers would fail with torch's AttributeError
            value = self.dtype if field == "dtype" else kwargs.get(field)
            if isinstance(value, str) and not isinstance(getattr(torch, value, None), torch.dtype):
                raise ValueError(
                    f"config field {field}={value!r} is not a torch dtype (use float32, bfloat16, float16 or float64)"
                )
        super().__post_init__(**kwargs)
        self.rope_base = float(self.rope_base)
        # Build the native config once: it validates every size and raises ValueError naming the field.
        native = self.to_model_config()
        self.num_kv_heads = native.num_kv_heads
        self.attention_pattern = canonical_pattern(self.attention_pattern, native)

    def __setattr__(self, key: str, value: Any) -> None:
        # After construction, a new pattern is validated (and canonicalised) as it is set, so a config
        # can never hold a pattern the model cannot run.
        if key == "attention_pattern" and self.__dict__.get("_post_init_done", False):
            value = canonical_pattern(value, self.to_model_config())
        super().__setattr__(key, value)

    # ---- standard names, derived (read-only): vLLM, PEFT and accelerate's size estimators read them ----
    @property
    def intermediate_size(self) -> int:
        """FFN width (``ffn_dim``, else ``ffn_mult`` x ``d_model``)."""
        return self.ffn_dim if self.ffn_dim is not None else self.ffn_mult * self.d_model

    @intermediate_size.setter
    def intermediate_size(self, value: Any) -> None:
        _read_only("intermediate_size", "ffn_dim (or ffn_mult)")

    @property
    def head_dim(self) -> int:
        """Per-head width, ``d_model // num_heads``."""
        return self.d_model // self.num_heads

    @head_dim.setter
    def head_dim(self, value: Any) -> None:
        _read_only("head_dim", "d_model and num_heads")

    @property
    def rope_theta(self) -> float:
        """RoPE base (``rope_base``)."""
        return float(self.rope_base)

    @rope_theta.setter
    def rope_theta(self, value: Any) -> None:
        _read_only("rope_theta", "rope_base")

    @property
    def hidden_act(self) -> str:
        """The FFN activation in transformers' ``ACT2FN`` names: ``gelu`` (exact) or ``silu`` (SwiGLU's gate)."""
        return "silu" if self.ffn_act == "swiglu" else "gelu"

    @hidden_act.setter
    def hidden_act(self, value: Any) -> None:
        _read_only("hidden_act", "ffn_act")

    def validate_architecture(self) -> None:
        """Part of the ``@strict`` validation ``transformers`` runs after ``__init__``."""
        native = self.to_model_config()
        canonical_pattern(self.attention_pattern, native)

    # ---- native <-> HF -------------------------------------------------------------------------
    def to_model_config(self) -> ModelConfig:
        """The native ``ratplus.ModelConfig`` with the same architecture."""
        values = {name: getattr(self, name) for name in NATIVE_FIELDS}
        values["rope_base"] = float(values["rope_base"])
        return ModelConfig(name=self.preset, **values)

    @classmethod
    def from_model_config(
        cls, config: ModelConfig, attention_pattern: PatternSpec = None, **kwargs: Any
    ) -> RATPlusConfig:
        """HF config for a native ``ModelConfig``; ``attention_pattern`` is any pattern spec."""
        values: dict[str, Any] = {name: getattr(config, name) for name in NATIVE_FIELDS}
        values["preset"] = config.name
        values["attention_pattern"] = canonical_pattern(attention_pattern, config)
        values.update(kwargs)
        return cls(**values)


def _read_only(name: str, native: str) -> None:
    raise AttributeError(f"{name} is derived from {native}: set that instead (RATPlusConfig.{name} is read-only)")


def canonical_pattern(spec: PatternSpec, config: ModelConfig) -> str:
    """``config.canonical_pattern(spec)`` (argument order of this module's callers): validate a pattern
    spec against the architecture and return its canonical string form; ValueError naming the bad part
    when it does not parse or does not fit the model (wrong head count, per-layer list of the wrong
    length)."""
    return config.canonical_pattern(spec)

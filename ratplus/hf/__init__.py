"""Hugging Face ``transformers`` integration (needs ``transformers>=5``: ``pip install ratplus[hf]``).

Importing this module registers ``model_type = "ratplus"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, so that::

    import ratplus.hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("path/to/hf-folder")
    model.set_attention_pattern("D16-W256-P4")  # no reload
    out = model.generate(input_ids, max_new_tokens=32, do_sample=False)

A native model folder becomes an HF folder with ``ratplus convert SRC DST --to hf`` or in Python
with ``from_native(model).save_pretrained(dst)``.

Registration happens here and not on ``import ratplus``: it needs ``transformers``' model
machinery, which takes about 4 s to import on a 2-core CPU (``import ratplus`` alone about 1.3 s),
and ``transformers`` is an optional dependency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    import transformers
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError("ratplus.hf needs transformers>=5: pip install 'ratplus[hf]'") from e
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"ratplus.hf needs transformers>=5, found {transformers.__version__}")

from ratplus.config import PatternSpec
from ratplus.hf.cache import RATPlusHFCache
from ratplus.hf.configuration import RATPlusConfig, canonical_pattern
from ratplus.hf.modeling import RATPlusForCausalLM, RATPlusModel, RATPlusPreTrainedModel, save_tokenizer
from ratplus.model.rat import RATPlusLM

__all__ = [
    "RATPlusConfig",
    "RATPlusForCausalLM",
    "RATPlusHFCache",
    "RATPlusModel",
    "RATPlusPreTrainedModel",
    "canonical_pattern",
    "from_native",
    "register",
    "save_tokenizer",
    "to_native",
]


def register() -> None:
    """Register ``ratplus`` with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(RATPlusConfig.model_type, RATPlusConfig, exist_ok=True)
    AutoModel.register(RATPlusConfig, RATPlusModel, exist_ok=True)
    AutoModelForCausalLM.register(RATPlusConfig, RATPlusForCausalLM, exist_ok=True)


def from_native(
    model: RATPlusLM | str | Path, attention_pattern: PatternSpec = None, tokenizer: Any = None
) -> RATPlusForCausalLM:
    """Wrap a native ``RATPlusLM`` (sharing its weights, no copy) or load a native model folder.

    ``attention_pattern``: the default pattern (any spec); None = the folder's ``adapted_pattern``
    metadata when it has one, else dense. A folder's tokenizer is attached for ``save_pretrained``."""
    import torch

    from ratplus.io.folder import load_pretrained, load_tokenizer
    from ratplus.io.metadata import read_metadata

    if isinstance(model, (str, Path)):
        folder = Path(model)
        native = load_pretrained(folder)
        if attention_pattern is None:
            attention_pattern = read_metadata(folder).adapted_pattern
        if tokenizer is None:
            tokenizer = load_tokenizer(folder)
    elif isinstance(model, RATPlusLM):
        native = model
    else:
        raise ValueError(f"from_native expects a RATPlusLM or a model folder, got {type(model).__name__}")
    config = RATPlusConfig.from_model_config(native.config, attention_pattern)
    # Build the wrapper on the meta device (no weight init, no memory), then hand it the real model.
    with torch.device("meta"):
        hf = RATPlusForCausalLM(config)
    hf.model.attach(native)
    hf.train(native.training)
    if tokenizer is not None:
        hf.attach_tokenizer(tokenizer)
    return hf


def to_native(model: RATPlusForCausalLM) -> RATPlusLM:
    """The native ``RATPlusLM`` inside an HF model (shares the weights)."""
    if not isinstance(model, RATPlusForCausalLM):
        raise ValueError(f"to_native expects a RATPlusForCausalLM, got {type(model).__name__}")
    return model.native


register()

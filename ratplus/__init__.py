"""ratplus: RAT+ (recurrence-augmented attention), trained dense, run sparse.

Public API::

    from ratplus import ModelConfig, AttentionPattern, RATPlusLM, generate
    model = RATPlusLM(ModelConfig.from_preset("tiny"))
    logits = model(input_ids, pattern="D16-W256-P4")
    tokens = generate(model, input_ids, max_new_tokens=32, pattern="D16-W256-P4")  # (B, T + new)
"""

from ratplus.config import PRESETS, AttentionPattern, HeadGroups, ModelConfig, resolve_pattern
from ratplus.generation import generate
from ratplus.model import RATPlusLM

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AttentionPattern",
    "HeadGroups",
    "ModelConfig",
    "RATPlusLM",
    "__version__",
    "generate",
    "resolve_pattern",
]

"""ratplus: RAT+ (recurrence-augmented attention), trained dense, run sparse.

Public API::

    from ratplus import ModelConfig, AttentionPattern, RATPlusLM
    model = RATPlusLM(ModelConfig.from_preset("tiny"))
    logits = model(input_ids, pattern="D16-W256-P4")
"""

from ratplus.config import PRESETS, AttentionPattern, HeadGroups, ModelConfig, resolve_pattern
from ratplus.model import RATPlusLM

__version__ = "0.1.0"

__all__ = ["PRESETS", "AttentionPattern", "HeadGroups", "ModelConfig", "RATPlusLM", "__version__", "resolve_pattern"]

"""RAT+ modules: the layer and the LM (``rat.py``)."""

from ratplus.model.rat import FFN, Block, LMOutput, RATPlusLayer, RATPlusLM, RMSNorm

__all__ = ["FFN", "Block", "LMOutput", "RATPlusLM", "RATPlusLayer", "RMSNorm"]

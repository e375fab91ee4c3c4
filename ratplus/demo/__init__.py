"""The end-to-end demo job: ``pipeline`` (the stages) and ``report`` (report.md, plots, summary)."""

from ratplus.demo.pipeline import ADAPT_PATTERNS, NEEDLE_PATTERNS, Demo, DemoConfig

__all__ = ["ADAPT_PATTERNS", "NEEDLE_PATTERNS", "Demo", "DemoConfig"]

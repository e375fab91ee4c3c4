"""The end-to-end demo job: ``pipeline`` (the stages, each reused when its inputs did not change)
and ``report`` (targets, report.md, plots, the printed summary). The pattern lists both share:"""

ADAPT_PATTERNS = ("D16-W0-P0", "D64-W0-P0", "D16-W64-P4")  # each pretrained model is adapted to these
MODELS = ("ratplus", "baseline")

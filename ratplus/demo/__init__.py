"""The end-to-end demo job: ``pipeline`` (the stages, each reused when its inputs did not change)
and ``report`` (targets, report.md, plots, the printed summary). The pattern lists both share:"""

ADAPT_PATTERNS = ("D16-W0-P0", "D64-W0-P0", "D16-W64-P4")  # each pretrained model is adapted to these
MODELS = ("ratplus", "baseline")
# quality vs KV bytes (eval.budget) of both pretrained models: RAT+ patterns, sinks + window (StreamingLLM on
# the baseline) and SnapKV, at the budgets of D64 / D16 / D4 with a 256-token context (eval.budget.default_sweep)
BUDGET_PATTERNS = (
    "dense",
    "D4",
    "D16",
    "D64",
    "local-W0-P4",
    "local-W12-P4",
    "local-W60-P4",
    "snapkv-C5-O4",
    "snapkv-C53-O4",
)

#: The sample text of the serve stage (and the report's ``generate`` command) starts from this prompt.
SAMPLE_PROMPTS = {"shakespeare": "ROMEO.\n", "wikipedia": "The "}
#: The held-out documents as JSON lines (``{"text": ...}``), under ``<out>/data``: ``eval ppl --data`` reads it.
HELDOUT_FILE = "heldout.jsonl"


def model_name(which: str, pattern: str) -> str:
    """The stable name of a demo model under ``<out>/models``: ``ratplus``, ``baseline`` (pretrained, dense),
    ``ratplus-D16-W0-P0`` (adapted to that pattern)."""
    return which if pattern == "dense" else f"{which}-{pattern}"

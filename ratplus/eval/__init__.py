"""Evaluation: held-out perplexity per pattern, RULER needle-in-a-haystack, LongBench v1, and the
lm-evaluation-harness model class (``ratplus.eval.harness``, imported only when lm-eval is used).

Library entry points (the ``ratplus eval`` commands and the demo call these)::

    from ratplus.eval import open_checkpoint, evaluate_ppl, generate_niah, evaluate_niah
    em = open_checkpoint("runs/demo/adapted-D16")          # model + tokenizer + metadata, read-only
    rows = evaluate_ppl(em, texts, ["dense", "D16"])       # one row per pattern
    samples = generate_niah(em.tokenizer, "niah_single_1", [512], num_samples=4, max_len=512)
    result = evaluate_niah(em, samples, pattern="D16")     # result["scores"][task][length]
"""

from ratplus.eval.common import EvalModel, adaptation_status, open_checkpoint, pattern_costs
from ratplus.eval.longbench import evaluate_longbench, load_longbench
from ratplus.eval.niah import NIAH_TASKS, evaluate_niah, generate_niah, string_match_all, to_sft
from ratplus.eval.ppl import evaluate_ppl

__all__ = [
    "NIAH_TASKS",
    "EvalModel",
    "adaptation_status",
    "evaluate_longbench",
    "evaluate_niah",
    "evaluate_ppl",
    "generate_niah",
    "load_longbench",
    "open_checkpoint",
    "pattern_costs",
    "string_match_all",
    "to_sft",
]

"""LongBench v1 (English and code tasks) on local data files: prompts, middle truncation, scoring.

Data: the user's LongBench JSONL files (one per dataset, named ``<dataset>.jsonl``, as in the
official release); each record needs ``input`` (str), ``context`` (str) and ``answers`` (list of
str), plus ``all_classes`` (list of str) for the classification task ``trec``. Nothing is downloaded.

Protocol (the LongBench reference settings, docs/DESIGN.md section 6): the dataset's prompt template,
greedy decoding of at most the dataset's generation length, and middle truncation: when the prompt
has more tokens than ``context_length - max_new_tokens``, its first and last halves are kept (so the
instruction at both ends survives and prompt + answer fit the model).

Scores (x100, best over gold answers, mean over records): QA-F1 (token F1 after lowercasing and
removing punctuation and articles), Rouge-L F1 (LCS over lowercased whitespace tokens; LongBench's
``rouge`` package uses a summary-level LCS and may differ slightly), classification accuracy
(matched class names; a prediction naming k classes including the gold one scores 1/k), edit
similarity for code (first non-comment line of the output vs the gold line, indel ratio as in
``fuzz.ratio``), and the count / retrieval scores of the synthetic tasks.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ratplus.config import PatternSpec
from ratplus.eval._decode import greedy_generate, new_tokens
from ratplus.eval.common import EvalModel, decode, encode, warn_if_not_adapted
from ratplus.runtime import parse_jsonl

# ---- metrics -------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, gold: str, **_: Any) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def _lcs_len(a: list[Any] | str, b: list[Any] | str) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_score(prediction: str, gold: str, **_: Any) -> float:
    p, g = prediction.lower().split(), gold.lower().split()
    lcs = _lcs_len(p, g)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, gold: str, all_classes: list[str] | None = None, **_: Any) -> float:
    """1/k when the prediction names k classes and the gold class is one of them (a class that is
    only part of the gold class's name is not counted), else 0."""
    if not all_classes:
        raise ValueError("classification scoring needs the record's 'all_classes'")
    matched = [c for c in all_classes if c in prediction]
    matched = [c for c in matched if c == gold or c not in gold]
    return 1.0 / len(matched) if gold in matched else 0.0


def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, gold: str, **_: Any) -> float:
    """Share of the numbers in the prediction that equal the gold count."""
    return _number_share(prediction, str(gold))


def retrieval_score(prediction: str, gold: str, **_: Any) -> float:
    """Share of the numbers in the prediction that equal the gold paragraph number ("Paragraph N")."""
    m = re.search(r"Paragraph (\d+)", gold)
    if m is None:
        raise ValueError(f"retrieval answer {gold!r} does not name a paragraph ('Paragraph N')")
    return _number_share(prediction, m.group(1))


def edit_similarity(prediction: str, gold: str, **_: Any) -> float:
    """Edit similarity of code: the first output line that is not blank and not a comment or code
    fence, against the gold line; indel ratio 2 * LCS / (len a + len b), rounded to 0.01."""
    line = next(
        (ln for ln in prediction.split("\n") if ln.strip() and "`" not in ln and "#" not in ln and "//" not in ln),
        "",
    )
    total = len(line) + len(gold)
    if total == 0:
        return 1.0
    return round(100 * 2 * _lcs_len(line, gold) / total) / 100


# ---- tasks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LongBenchTask:
    prompt: str
    max_new_tokens: int
    metric: Callable[..., float]
    metric_name: str
    first_line: bool = False  # few-shot tasks: score only the first line of the output


_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)
_CODE = "Please complete the code given below. \n{context}"

#: LongBench v1 English and code datasets: the benchmark's own prompt templates (including the
#: missing space in narrativeqa's "asconcisely", kept so scores stay comparable) and lengths.
LONGBENCH_TASKS: dict[str, LongBenchTask] = {
    "narrativeqa": LongBenchTask(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128,
        qa_f1_score,
        "qa_f1",
    ),
    "qasper": LongBenchTask(
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as "
        "concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
        'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
        128,
        qa_f1_score,
        "qa_f1",
    ),
    "multifieldqa_en": LongBenchTask(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64,
        qa_f1_score,
        "qa_f1",
    ),
    "hotpotqa": LongBenchTask(_QA_PASSAGES, 32, qa_f1_score, "qa_f1"),
    "2wikimqa": LongBenchTask(_QA_PASSAGES, 32, qa_f1_score, "qa_f1"),
    "musique": LongBenchTask(_QA_PASSAGES, 32, qa_f1_score, "qa_f1"),
    "gov_report": LongBenchTask(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512,
        rouge_l_score,
        "rouge_l",
    ),
    "qmsum": LongBenchTask(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512,
        rouge_l_score,
        "rouge_l",
    ),
    "multi_news": LongBenchTask(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:",
        512,
        rouge_l_score,
        "rouge_l",
    ),
    "trec": LongBenchTask(
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64,
        classification_score,
        "classification",
        first_line=True,
    ),
    "triviaqa": LongBenchTask(
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}",
        32,
        qa_f1_score,
        "qa_f1",
        first_line=True,
    ),
    "samsum": LongBenchTask(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128,
        rouge_l_score,
        "rouge_l",
        first_line=True,
    ),
    "passage_count": LongBenchTask(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        32,
        count_score,
        "count",
    ),
    "passage_retrieval_en": LongBenchTask(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the "
        'paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\n'
        "The answer is: ",
        32,
        retrieval_score,
        "retrieval",
    ),
    "lcc": LongBenchTask(_CODE + "Next line of code:\n", 64, edit_similarity, "edit_sim"),
    "repobench-p": LongBenchTask(_CODE + "{input}Next line of code:\n", 64, edit_similarity, "edit_sim"),
}


def _dataset_name(name: str) -> str:
    # LongBench-E files are named <dataset>_e.jsonl and use the same prompts and metrics.
    base = name[:-2] if name.endswith("_e") and name[:-2] in LONGBENCH_TASKS else name
    if base not in LONGBENCH_TASKS:
        raise ValueError(f"unknown LongBench dataset {name!r}; known: {', '.join(LONGBENCH_TASKS)}")
    return base


def check_record(rec: Any, dataset: str, where: str) -> dict[str, Any]:
    """Validate one record; raise ValueError naming ``where`` (file:line) and the bad field."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("input", "context"):
        if not isinstance(rec.get(key), str):
            raise ValueError(f"{where}: field {key!r} must be a string" + (" (missing)" if key not in rec else ""))
    answers = rec.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: field 'answers' must be a non-empty list of strings")
    classes = rec.get("all_classes")
    if LONGBENCH_TASKS[dataset].metric is classification_score and (
        not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes)
    ):
        raise ValueError(f"{where}: dataset {dataset} needs 'all_classes', a non-empty list of strings")
    if LONGBENCH_TASKS[dataset].metric is retrieval_score:
        for a in answers:
            if re.search(r"Paragraph (\d+)", a) is None:
                raise ValueError(f"{where}: retrieval answer {a!r} does not name a paragraph ('Paragraph N')")
    return rec


def load_longbench(paths: list[str | Path], datasets: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Records per dataset from LongBench JSONL files or folders of them (``<dataset>.jsonl``).

    The dataset is the record's ``dataset`` field when present, else the file name. ``datasets``
    keeps only those (each must be found)."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise FileNotFoundError(f"no LongBench .jsonl files in folder {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"LongBench data not found: {p}")
    wanted = None if datasets is None else {_dataset_name(d) for d in datasets}
    out: dict[str, list[dict[str, Any]]] = {}
    for f in files:
        try:
            file_dataset: str | None = _dataset_name(f.stem)
        except ValueError:
            file_dataset = None  # then every record must say its dataset
        if wanted is not None and file_dataset is not None and file_dataset not in wanted:
            continue
        for where, rec in parse_jsonl(f.read_text(encoding="utf-8"), f):
            name = file_dataset
            if isinstance(rec, dict) and isinstance(rec.get("dataset"), str):
                name = _dataset_name(rec["dataset"])
            if name is None:
                raise ValueError(
                    f"{where}: the file name is not a LongBench dataset and the record has no 'dataset' field"
                )
            if wanted is None or name in wanted:
                out.setdefault(name, []).append(check_record(rec, name, where))
    if wanted is not None:
        missing = sorted(wanted - set(out))
        if missing:
            raise ValueError(f"no records for LongBench dataset(s) {', '.join(missing)} in the given data")
    if not out:
        raise ValueError("the LongBench data holds no records")
    return out


# ---- running --------------------------------------------------------------------------------------


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """Keep the first budget // 2 and the last budget - budget // 2 tokens when over budget."""
    if budget < 2:
        raise ValueError(f"the LongBench prompt budget must be >= 2 tokens, got {budget}")
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head) :]


def postprocess(dataset: str, prediction: str) -> str:
    if LONGBENCH_TASKS[dataset].first_line:
        return prediction.lstrip("\n").split("\n")[0]
    return prediction


def score_record(dataset: str, prediction: str, rec: dict[str, Any]) -> float:
    """Best score (0..1) of a prediction over the record's gold answers."""
    task = LONGBENCH_TASKS[dataset]
    pred = postprocess(dataset, prediction)
    if task.metric is not edit_similarity:  # code keeps its leading whitespace
        pred = pred.strip()
    return max(task.metric(pred, gold, all_classes=rec.get("all_classes")) for gold in rec["answers"])


def evaluate_longbench(
    em: EvalModel,
    data: dict[str, list[dict[str, Any]]],
    pattern: PatternSpec = None,
    context_length: int = 4096,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate and score every record; returns {model, pattern, status, context_length, scores:
    {dataset: score x100}, average, predictions: [...]}.

    ``context_length`` is capped at the model's max_seq_len; prompts are middle-truncated to
    context_length minus the dataset's generation length."""
    tokenizer = em.require_tokenizer("LongBench evaluation")
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit (--limit, records per dataset) must be >= 1, got {limit}")
    ctx = min(context_length, em.config.max_seq_len)
    name = em.config.canonical_pattern(pattern)
    status = warn_if_not_adapted(em, pattern)
    stop = [em.eos_id] if em.eos_id is not None else []
    scores: dict[str, float] = {}
    predictions = []
    for dataset, records in data.items():
        task = LONGBENCH_TASKS[dataset]
        recs = records[:limit] if limit else records
        budget = ctx - task.max_new_tokens
        if budget < 2:
            raise ValueError(
                f"context length {ctx} leaves no room for {dataset}'s prompt after {task.max_new_tokens} new tokens"
            )
        total = 0.0
        for i, rec in enumerate(tqdm(recs, desc=f"longbench {dataset} {name}", disable=not progress, leave=False)):
            ids = truncate_middle(
                encode(tokenizer, task.prompt.format(context=rec["context"], input=rec["input"])), budget
            )
            x = torch.tensor([ids], dtype=torch.long, device=em.device)
            gen = new_tokens(greedy_generate(em.model, x, task.max_new_tokens, pattern, stop), len(ids), stop)
            pred = decode(tokenizer, gen)
            s = score_record(dataset, pred, rec)
            total += s
            predictions.append(
                {
                    "dataset": dataset,
                    "index": i,
                    "pred": pred,
                    "answers": rec["answers"],
                    "score": s,
                    "prompt_tokens": len(ids),
                    "all_classes": rec.get("all_classes"),
                    "length": rec.get("length"),
                }
            )
        scores[dataset] = 100.0 * total / len(recs)
    return {
        "model": em.name,
        "pattern": name,
        "status": status,
        "context_length": ctx,
        "scores": scores,
        "average": sum(scores.values()) / len(scores),
        "predictions": predictions,
    }

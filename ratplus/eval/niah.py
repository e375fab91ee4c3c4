"""Needle in a haystack, offline: the 8 RULER NIAH tasks (docs/DESIGN.md section 6).

Each sample is a long text (the haystack) with one or more needle sentences
``One of the special magic {numbers|uuids} for {key} is: {value}.`` inserted at chosen depths,
followed by a question about some keys. The model answers by greedy decoding (up to 128 new tokens
by default); the score is string-match-all: the fraction of gold values found anywhere in the output
(case-insensitive), times 100, averaged over samples.

| task            | haystack  | key   | value   | keys | values/key | queried keys |
|-----------------|-----------|-------|---------|------|------------|--------------|
| niah_single_1   | noise     | words | numbers | 1    | 1          | 1            |
| niah_single_2   | essay     | words | numbers | 1    | 1          | 1            |
| niah_single_3   | essay     | words | uuids   | 1    | 1          | 1            |
| niah_multikey_1 | essay     | words | numbers | 4    | 1          | 1            |
| niah_multikey_2 | needles   | words | numbers | 1    | 1          | 1            |
| niah_multikey_3 | needles   | uuids | uuids   | 1    | 1          | 1            |
| niah_multivalue | essay     | words | numbers | 1    | 4          | 1            |
| niah_multiquery | essay     | words | numbers | 4    | 1          | 4            |

Haystacks: ``noise`` repeats one paragraph; ``essay`` is consecutive sentences of a prose file (by
default the bundled Shakespeare plays), starting at a random sentence; ``needles`` is made of
distractor needles with other keys. Keys are adjective-noun pairs from the ``wonderwords`` word
lists or UUIDs; values are 7-digit numbers or UUIDs.

Sizing: a sample of length L holds as many haystack units as fit so that the prompt's token count
(with the model's own tokenizer) plus ``max_new_tokens`` is at most L. The first queried needle sits
at the requested depth (0 = start of the haystack, 100 = end); other needles at random depths.

Records (JSONL): ``input`` (question included), ``answer_prefix`` (appended after a space to make
the model prompt), ``outputs`` (gold strings), ``task``, ``length``, ``depth``, ``prompt_tokens``,
... The SFT form is ``{"prompt", "answer"}`` with the answer values joined by ", ".
"""

from __future__ import annotations

import logging
import random
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ratplus.config import PatternSpec
from ratplus.eval._decode import greedy_generate, new_tokens
from ratplus.eval.common import EvalModel, decode, encode, warn_if_not_adapted
from ratplus.io.corpus import bundled_documents, wheel_files

logger = logging.getLogger("ratplus")

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What are all the special magic {type_v} for {query} mentioned in the provided text?"
)
# One gold value: RULER's singular wording of the same template.
TEMPLATE_ONE = (
    "A special magic {type_v1} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v1} afterwards.\n{context}\n"
    "What is the special magic {type_v1} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = "The special magic {type_v} for {query} mentioned in the provided text are"
ANSWER_PREFIX_ONE = "The special magic {type_v1} for {query} mentioned in the provided text is"

DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
DEFAULT_MAX_NEW_TOKENS = 128
SPLITS = ("train", "test")

Haystack = Literal["noise", "essay", "needles"]


@dataclass(frozen=True)
class NiahTask:
    """One RULER NIAH configuration (see the module table)."""

    name: str
    haystack: Haystack
    key_type: Literal["words", "uuids"]
    value_type: Literal["numbers", "uuids"]
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1

    @property
    def num_gold(self) -> int:
        return self.num_queries * self.num_values


NIAH_TASKS: dict[str, NiahTask] = {
    t.name: t
    for t in (
        NiahTask("niah_single_1", "noise", "words", "numbers"),
        NiahTask("niah_single_2", "essay", "words", "numbers"),
        NiahTask("niah_single_3", "essay", "words", "uuids"),
        NiahTask("niah_multikey_1", "essay", "words", "numbers", num_keys=4),
        NiahTask("niah_multikey_2", "needles", "words", "numbers"),
        NiahTask("niah_multikey_3", "needles", "uuids", "uuids"),
        NiahTask("niah_multivalue", "essay", "words", "numbers", num_values=4),
        NiahTask("niah_multiquery", "essay", "words", "numbers", num_keys=4, num_queries=4),
    )
}


def resolve_tasks(tasks: str | Iterable[str] | None) -> list[NiahTask]:
    """``None`` / ``"all"`` -> all 8; else comma-separated names (or a list); unknown names raise."""
    if tasks is None or tasks == "all":
        return list(NIAH_TASKS.values())
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    unknown = [n for n in names if n not in NIAH_TASKS]
    if unknown:
        raise ValueError(f"unknown NIAH task(s) {', '.join(unknown)}; choose from {', '.join(NIAH_TASKS)}")
    return [NIAH_TASKS[n] for n in names if n]


# ---- random keys and values ---------------------------------------------------------------------


def _wheel_file(package: str, name: str) -> Path:
    hint = f"NIAH word keys need the '{package}' wheel (pip install 'ratplus[data]', or pip install {package})"
    for path in wheel_files(package, lambda f: f.endswith(f"/{name}"), hint):
        return path
    raise FileNotFoundError(f"the installed '{package}' wheel has no {name}")


@lru_cache(maxsize=1)
def word_lists() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns) from the ``wonderwords`` wheel: single lowercase words, profanity removed."""
    banned = set(_wheel_file("wonderwords", "profanitylist.txt").read_text().split())

    def read(name: str) -> tuple[str, ...]:
        words = _wheel_file("wonderwords", name).read_text().split("\n")
        return tuple(sorted({w for w in words if w.isalpha() and w.islower() and w not in banned}))

    return read("adjectivelist.txt"), read("nounlist.txt")


class _Draw:
    """Random keys/values from one ``random.Random``; never repeats a string within a sample."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def one(self, kind: str) -> str:
        while True:
            if kind == "numbers":
                s = str(self.rng.randint(10**6, 10**7 - 1))
            elif kind == "uuids":
                s = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            elif kind == "words":
                adjs, nouns = word_lists()
                s = f"{self.rng.choice(adjs)}-{self.rng.choice(nouns)}"
            else:
                raise ValueError(f"unknown needle type {kind!r}")
            if s not in self.used:
                self.used.add(s)
                return s


# ---- haystacks ----------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalised sentences (split after . ! ? followed by space)."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+", flat) if s]


@lru_cache(maxsize=4)
def essay_sentences(path: str | None = None) -> tuple[str, ...]:
    """Sentences of a prose file (``None``: the bundled plays). Missing or empty files raise."""
    if path is None:
        text = "\n\n".join(bundled_documents())
        where = "the bundled corpus"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"NIAH essay file not found: {p}")
        text = p.read_text(encoding="utf-8", errors="replace")
        where = str(p)
    sentences = split_sentences(text)
    if not sentences:
        raise ValueError(f"NIAH essay {where} contains no text")
    return tuple(sentences)


def _haystack_units(task: NiahTask, rng: random.Random, used: set[str], essay: tuple[str, ...] | None):
    """A function n -> the first n haystack units of this sample, and the string joining them.

    ``rng`` is the haystack's own stream; ``used`` holds the sample's keys and values, which
    distractor needles must not repeat."""
    if task.haystack == "noise":
        return (lambda n: [NOISE] * n), "\n"
    if task.haystack == "essay":
        assert essay is not None
        start = rng.randrange(len(essay))
        return (lambda n: [essay[(start + i) % len(essay)] for i in range(n)]), " "
    draw = _Draw(rng)
    draw.used = used
    units: list[str] = []

    def distractors(n: int) -> list[str]:
        while len(units) < n:
            units.append(
                NEEDLE.format(type_v=task.value_type, key=draw.one(task.key_type), value=draw.one(task.value_type))
            )
        return units[:n]

    return distractors, "\n"


def _assemble(units: list[str], needles: list[str], fracs: list[float], joiner: str) -> str:
    """Insert needle i before unit round(fracs[i] * n) (after the last unit when that is n)."""
    n = len(units)
    at: dict[int, list[str]] = {}
    for needle, f in zip(needles, fracs):
        at.setdefault(round(f * n), []).append(needle)
    parts: list[str] = []
    for i in range(n + 1):
        parts.extend(at.get(i, ()))
        if i < n:
            parts.append(units[i])
    return joiner.join(parts)


# ---- samples -------------------------------------------------------------------------------------


def _sample(
    task: NiahTask,
    length: int,
    depth: float,
    tokenizer: Any,
    rng: random.Random,
    essay: tuple[str, ...] | None,
    max_new_tokens: int,
) -> dict[str, Any]:
    draw = _Draw(rng)
    num_keys = max(task.num_keys, task.num_queries)
    keys = [draw.one(task.key_type) for _ in range(num_keys)]
    values = [[draw.one(task.value_type) for _ in range(task.num_values)] for _ in keys]
    queried = list(range(task.num_queries))  # the first keys are asked about, the rest are distractors
    needles, fracs = [], []
    for ki, key in enumerate(keys):
        for vi, value in enumerate(values[ki]):
            needles.append(NEEDLE.format(type_v=task.value_type, key=key, value=value))
            fracs.append(depth / 100.0 if (ki, vi) == (0, 0) else rng.random())
    query_keys = [keys[i] for i in queried]
    outputs = [v for i in queried for v in values[i]]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    one = task.num_gold == 1
    type_v1 = task.value_type[:-1]
    template = TEMPLATE_ONE if one else TEMPLATE
    prefix = (ANSWER_PREFIX_ONE if one else ANSWER_PREFIX).format(type_v=task.value_type, type_v1=type_v1, query=query)
    units_fn, joiner = _haystack_units(task, random.Random(rng.getrandbits(64)), draw.used, essay)

    def build(n: int) -> tuple[str, int]:
        context = _assemble(units_fn(n), needles, fracs, joiner)
        text = template.format(type_v=task.value_type, type_v1=type_v1, context=context, query=query)
        return text, len(encode(tokenizer, text + " " + prefix))

    budget = length - max_new_tokens
    text, ntok = build(0)
    if ntok > budget:
        raise ValueError(
            f"NIAH length {length} is too short for {task.name}: the prompt without any haystack takes "
            f"{ntok} tokens and {max_new_tokens} more are reserved for the answer"
        )
    # Largest haystack that fits: grow geometrically, then bisect (token count grows with n).
    lo, hi = 0, 1
    while hi <= length and build(hi)[1] <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, length + 1)  # every unit costs at least one token, so length + 1 units never fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if build(mid)[1] <= budget:
            lo = mid
        else:
            hi = mid
    text, ntok = build(lo)
    return {
        "task": task.name,
        "length": length,
        "depth": depth,
        "input": text,
        "answer_prefix": prefix,
        "outputs": outputs,
        "query": query,
        "haystack": task.haystack,
        "haystack_units": lo,
        "prompt_tokens": ntok,
        "max_new_tokens": max_new_tokens,
    }


def generate_niah(
    tokenizer: Any,
    tasks: str | Iterable[str] | None = None,
    lengths: Iterable[int] = (1024, 2048, 4096),
    num_samples: int = 10,
    depths: Iterable[float] = DEFAULT_DEPTHS,
    split: str = "test",
    seed: int = 0,
    essay_path: str | Path | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_len: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """NIAH samples for every (task, length): ``num_samples`` each, depths cycled through ``depths``.

    ``split`` ("train" or "test") and ``seed`` select the random stream, so the train split used for
    SFT and the test split never share samples. ``max_len`` (the model's max_seq_len) rejects lengths
    the model cannot hold. Deterministic for fixed arguments and tokenizer.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    task_list = resolve_tasks(tasks)
    lengths = [int(n) for n in lengths]
    depths = [float(d) for d in depths]
    if not lengths:
        raise ValueError("no NIAH lengths given")
    if not depths:
        raise ValueError("no NIAH depths given")
    for d in depths:
        if not 0 <= d <= 100:
            raise ValueError(f"NIAH depth {d} is outside [0, 100]")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for n in lengths:
        if n < 1:
            raise ValueError(f"NIAH length must be positive, got {n}")
        if max_len is not None and n > max_len:
            raise ValueError(f"NIAH length {n} exceeds the model's max_seq_len={max_len}")
    essay = None
    if any(t.haystack == "essay" for t in task_list):
        essay = essay_sentences(None if essay_path is None else str(essay_path))
    records = []
    jobs = [(t, n) for t in task_list for n in lengths]
    for task, n in tqdm(jobs, desc=f"niah {split} samples", disable=not progress, leave=False):
        # String seeds are hashed with SHA-512 by random.Random: stable across runs and machines.
        rng = random.Random(f"ratplus-niah:{split}:{seed}:{task.name}:{n}")
        for i in range(num_samples):
            rec = _sample(task, n, depths[i % len(depths)], tokenizer, rng, essay, max_new_tokens)
            rec.update(index=i, split=split, seed=seed)
            records.append(rec)
    return records


def prompt_of(record: dict[str, Any]) -> str:
    """The text the model continues: the input, a space, the answer prefix."""
    return record["input"] + " " + record["answer_prefix"]


def to_sft(record: dict[str, Any]) -> dict[str, Any]:
    """SFT form: ``{"prompt", "answer"}`` (answer = " v1, v2." ; the trainer appends EOS)."""
    return {
        "prompt": prompt_of(record),
        "answer": " " + ", ".join(record["outputs"]) + ".",
        "task": record["task"],
        "length": record["length"],
    }


# ---- scoring and evaluation -------------------------------------------------------------------------


def string_match_all(prediction: str, golds: list[str]) -> float:
    """Fraction (0..1) of gold strings that occur in the prediction, case-insensitive."""
    if not golds:
        raise ValueError("a NIAH record has no gold outputs")
    pred = prediction.lower()
    return sum(g.lower() in pred for g in golds) / len(golds)


REQUIRED_KEYS = ("task", "length", "input", "answer_prefix", "outputs")


def check_record(record: dict[str, Any], where: str = "NIAH record") -> None:
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    outs = record["outputs"]
    if not isinstance(outs, list) or not outs or not all(isinstance(o, str) for o in outs):
        raise ValueError(f"{where}: 'outputs' must be a non-empty list of strings")


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{task: {length: mean string-match-all x 100}} plus a "mean" task averaging the tasks."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in records:
        acc.setdefault(r["task"], {}).setdefault(str(r["length"]), []).append(r["score"])
    scores = {t: {n: 100.0 * sum(v) / len(v) for n, v in by_len.items()} for t, by_len in acc.items()}
    lengths = sorted({n for by_len in scores.values() for n in by_len}, key=int)
    scores["mean"] = {
        n: sum(s[n] for s in scores.values() if n in s) / sum(1 for s in scores.values() if n in s) for n in lengths
    }
    return scores


def evaluate_niah(
    em: EvalModel,
    samples: list[dict[str, Any]],
    pattern: PatternSpec = None,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy-decode every sample with ``pattern`` and score it.

    Returns ``{"model", "pattern", "status", "scores": {task: {length: score}}, "samples": [...]}``
    where each sample gains ``prediction`` and ``score`` (0..1). ``max_new_tokens`` defaults to the
    value each sample was sized with.
    """
    tokenizer = em.require_tokenizer("NIAH evaluation")
    name = em.config.canonical_pattern(pattern)
    status = warn_if_not_adapted(em, pattern)
    stop = [em.eos_id] if em.eos_id is not None else []
    out = []
    for i, rec in enumerate(tqdm(samples, desc=f"niah {em.name} {name}", disable=not progress, leave=False)):
        check_record(rec, f"NIAH sample {i}")
        if int(rec["length"]) > em.config.max_seq_len:
            raise ValueError(f"NIAH length {rec['length']} exceeds the model's max_seq_len={em.config.max_seq_len}")
        n_new = int(max_new_tokens or rec.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        ids = encode(tokenizer, prompt_of(rec))
        if len(ids) + n_new > em.config.max_seq_len:
            raise ValueError(
                f"NIAH sample {i} ({rec['task']}, length {rec['length']}): {len(ids)} prompt tokens + {n_new} new "
                f"tokens exceed max_seq_len={em.config.max_seq_len}; was it generated with another tokenizer?"
            )
        x = torch.tensor([ids], dtype=torch.long, device=em.device)
        gen = new_tokens(greedy_generate(em.model, x, n_new, pattern, stop), len(ids), stop)
        pred = decode(tokenizer, gen)
        out.append({**rec, "prediction": pred, "score": string_match_all(pred, rec["outputs"])})
    return {"model": em.name, "pattern": name, "status": status, "scores": summarize(out), "samples": out}

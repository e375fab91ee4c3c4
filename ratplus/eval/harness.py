"""lm-evaluation-harness integration: a registered ``ratplus`` model class for lm-eval (0.4.x).

    python -m ratplus.cli.lm_eval --model ratplus \
        --model_args ckpt=PATH,pattern=D16-W256-P4 --tasks piqa,arc_easy

``model_args``: ``ckpt`` (model folder, required unless a model object is passed in Python),
``pattern`` (any pattern string, default dense), ``dtype`` (auto/float32/bfloat16), ``max_length``
(default: the model's max_seq_len), ``max_gen_toks`` (default 256), ``batch_size``, ``device``.

Requests are answered with the chosen attention pattern: loglikelihood (right-padded batches:
padding after a causal sequence cannot change its logits), loglikelihood_rolling (lm-eval's
disjoint rolling windows), and generate_until (greedy, through ``ratplus.eval._decode``).

This module imports ``lm_eval`` (the harness); ``ratplus.cli.lm_eval`` is only our command-line wrapper.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

# lm-eval fills its model registry lazily, only while the registry is empty: registering "ratplus"
# first would hide its own models (local-completions, hf, ...) from `ratplus eval lm-eval --model`
import lm_eval.models  # noqa: F401
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from ratplus.eval._decode import greedy_generate
from ratplus.eval.common import EvalModel, decode, encode, open_checkpoint, warn_if_not_adapted
from ratplus.runtime import resolve_device, resolve_dtype

logger = logging.getLogger("ratplus")

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def _int_arg(name: str, value: Any, default: int) -> int:
    if value is None or value == "auto" or value == "":
        return default
    try:
        n = int(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"lm-eval model_args {name} must be an integer, got {value!r}") from e
    if n < 1:
        raise ValueError(f"lm-eval model_args {name} must be >= 1, got {n}")
    return n


def _soft_device(name: str | None) -> str:
    """lm-eval's own ``--device`` defaults to cuda; on a machine without CUDA fall back to auto."""
    if not name:
        return "auto"
    if name.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("lm-eval --device %s but CUDA is not available; using the CPU", name)
        return "cpu"
    return name


def _split_config(arg_dict: dict[str, Any], additional: dict[str, Any] | None) -> dict[str, Any]:
    """model_args win over lm-eval's --batch_size/--device; its --device becomes a soft default."""
    extra = {k: v for k, v in (additional or {}).items() if v is not None}
    kwargs = dict(arg_dict)
    if "device" in extra:
        kwargs["harness_device"] = extra.pop("device")
    for k, v in extra.items():
        kwargs.setdefault(k, v)
    return kwargs


@register_model("ratplus")
class RATPlusHarnessLM(TemplateLM):
    """lm-eval ``LM`` over a RAT+ checkpoint evaluated with one attention pattern."""

    backend = "causal"

    def __init__(
        self,
        ckpt: str | None = None,
        pattern: str = "dense",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str | None = None,
        model: EvalModel | None = None,
        harness_device: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            logger.warning("ratplus lm-eval model: ignoring unknown model_args %s", ", ".join(sorted(kwargs)))
        if model is None:
            if not ckpt:
                raise ValueError("lm-eval model_args must name the checkpoint: --model_args ckpt=PATH[,pattern=...]")
            dev = resolve_device(device or _soft_device(harness_device))
            model = open_checkpoint(ckpt, device=dev, dtype=resolve_dtype(dtype, dev))
        self.em = model
        self.tokenizer = model.require_tokenizer("lm-eval")
        self.pattern = model.config.canonical_pattern(pattern)  # validates the pattern
        self.status = warn_if_not_adapted(model, pattern)
        self._batch_size = _int_arg("batch_size", batch_size, DEFAULT_BATCH_SIZE)
        self._max_length = _int_arg("max_length", max_length, model.config.max_seq_len)
        if self._max_length > model.config.max_seq_len:
            raise ValueError(
                f"max_length={self._max_length} exceeds the model's max_seq_len={model.config.max_seq_len}"
            )
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks, DEFAULT_MAX_GEN_TOKS)
        eos = model.eos_id
        if eos is None:
            raise ValueError(
                f"{model.name}: lm-eval needs an end-of-text token; set eos_token_id in config.json "
                "or add <|endoftext|> to the tokenizer"
            )
        self._eos = eos
        self._device = model.device
        logger.info("ratplus lm-eval model: %s, pattern %s (%s)", model.name, self.pattern, self.status)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> RATPlusHarnessLM:
        return cls(**_split_config(lm_utils.simple_parse_args_string(arg_string), additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> RATPlusHarnessLM:
        return cls(**_split_config(arg_dict, additional_config))

    # ---- properties lm-eval reads ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.em.path or self.em.name)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return encode(self.tokenizer, string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return decode(self.tokenizer, tokens)

    # ---- scoring ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False, **kw
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding reproduces it.

        The last max_length + 1 tokens of context + continuation are kept (left truncation)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        bar = tqdm(total=len(requests), desc=f"loglikelihood ({self.pattern})", disable=disable_tqdm, leave=False)
        for batch in batches:
            rows = []
            for i in batch:
                _, ctx, cont = requests[i]
                if not cont:
                    raise ValueError("lm-eval sent an empty continuation to score")
                whole = (ctx + cont)[-(self.max_length + 1) :]
                if len(cont) >= len(whole):
                    raise ValueError(
                        f"a continuation of {len(cont)} tokens does not fit the context of {self.max_length} tokens"
                    )
                rows.append((whole, len(cont)))
            T = max(len(w) - 1 for w, _ in rows)
            x = torch.zeros(len(rows), T, dtype=torch.long)  # right padding: never seen by earlier positions
            for b, (w, _) in enumerate(rows):
                x[b, : len(w) - 1] = torch.tensor(w[:-1])
            logprobs = F.log_softmax(self.em.model(x.to(self.device), pattern=self.pattern).float(), dim=-1)  # (B,T,V)
            for b, (i, (w, n)) in enumerate(zip(batch, rows)):
                L = len(w) - 1
                lp = logprobs[b, L - n : L]  # (n, V): positions predicting the continuation
                target = torch.tensor(w[-n:], device=lp.device)
                total = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (total, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents over lm-eval's disjoint rolling windows."""
        out = []
        for req in tqdm(requests, desc=f"loglikelihood_rolling ({self.pattern})", disable=disable_tqdm, leave=False):
            (string,) = req.args
            windows = [
                lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            total = float(sum(s for s, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ---- generation -----------------------------------------------------------------------------------
    @lru_cache(maxsize=16)  # noqa: B019 - a handful of distinct stop lists per run, model lives as long
    def _stop_ids(self, until: tuple[str, ...]) -> tuple[int, ...]:
        """Tokens whose text contains a stop string (stops a single-token stop early; longer stop
        strings are still cut from the decoded text)."""
        ids = {self._eos}
        if until:
            for tid in range(self.tokenizer.get_vocab_size()):
                text = self.tokenizer.decode([tid], skip_special_tokens=False)
                if any(u in text for u in until):
                    ids.add(tid)
        return tuple(sorted(ids))

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, desc=f"generate_until ({self.pattern})", disable=disable_tqdm, leave=False):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = _int_arg("max_gen_toks", kwargs.pop("max_gen_toks", None), self.max_gen_toks)
            if kwargs.get("do_sample"):
                logger.warning("ratplus lm-eval model decodes greedily; ignoring do_sample=True")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for context in max_length={self.max_length}")
            ctx = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.prefix_token_id]
            stop = self._stop_ids(tuple(until))
            x = torch.tensor([ctx], dtype=torch.long, device=self.device)
            gen = greedy_generate(self.em.model, x, max_new, self.pattern, stop)[0, len(ctx) :].tolist()
            for j, t in enumerate(gen):
                if t in stop:
                    # EOS is dropped; a token holding a stop string is kept so the text before the string survives
                    gen = gen[:j] if t == self._eos else gen[: j + 1]
                    break
            text = self.tok_decode(gen)
            for u in until:
                text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def check_task_specs(tasks: list[str], include_path: str | list[str] | None = None) -> None:
    """Fail early, naming the input, on a task YAML or include path that does not exist."""
    paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"lm-eval include path not found: {p}")
    for t in tasks:
        if t.endswith((".yaml", ".yml")) and not any(c in t for c in "*?[") and not Path(t).is_file():
            raise FileNotFoundError(f"lm-eval task file not found: {t}")


def evaluate_harness(
    em: EvalModel,
    tasks: list[str],
    pattern: str = "dense",
    include_path: str | list[str] | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_gen_toks: int | None = None,
    log_samples: bool = False,
    include_defaults: bool = True,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` (registered names or YAML paths) on an in-memory model with ``pattern``.

    ``include_defaults=False`` skips indexing lm-eval's built-in tasks (seconds) when every task is
    a YAML path or lives under ``include_path``. Returns lm-eval's results dict with ``ratplus`` =
    {model, pattern, status} added."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    check_task_specs(tasks, include_path)
    lm = RATPlusHarnessLM(pattern=pattern, batch_size=batch_size, max_gen_toks=max_gen_toks, model=em)
    specs = [str(Path(t).absolute()) if t.endswith((".yaml", ".yml")) else t for t in tasks]
    results = simple_evaluate(
        model=lm,
        tasks=specs,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=TaskManager(include_path=include_path, include_defaults=include_defaults),
        log_samples=log_samples,
        bootstrap_iters=0,
    )
    if results is None:  # lm-eval returns None on non-zero ranks only
        raise RuntimeError("lm-eval returned no results")
    results["ratplus"] = {"model": em.name, "pattern": lm.pattern, "status": lm.status}
    return results

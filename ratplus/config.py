"""Model configuration, attention patterns and named presets.

Everything here is plain data: no tensors, no modules. Two things live here:

* ``ModelConfig``: the architecture (docs/DESIGN.md section 2) plus named presets.
* ``AttentionPattern``: which keys each query sees (docs/DESIGN.md section 3), with a compact string
  form (``dense``, ``D16``, ``D16-W256-P4``, ``local-W64-P4``, ``topk-B64-K16-W64-P4-quest``), per-head
  groups (``D16:4+local-W64:4``) and per-layer lists (``D16/dense/D64/dense``).

A *pattern spec* (what ``RATPlusLM.forward(pattern=...)`` accepts) is any of: ``None`` (dense), a
string, an ``AttentionPattern``, a ``HeadGroups``, or a list with one of those per layer.
``resolve_pattern`` turns any spec into the canonical form the model runs: one ``HeadGroups`` per layer.

Bad values raise ``ValueError`` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

TopKScoring = Literal["quest", "moba"]
#: FFN kinds: the paper's GELU MLP, and Llama's SwiGLU (imported models).
FFN_ACTS = ("gelu", "swiglu")
#: Bound on any pattern size (D, W, P, block size, top-k): larger values cannot describe a real context.
MAX_PATTERN_SIZE = 2**31 - 1

#: SnapKV's pooling kernel: each key's vote is max-pooled over this many neighbouring positions, so
#: a selected key keeps the keys around it (SnapKV, Li et al. 2024, clusters its selection this way).
SNAPKV_KERNEL = 5


@dataclass(frozen=True)
class AttentionPattern:
    """One attention pattern: the key set S(t) of docs/DESIGN.md section 3.

    For query position t (0-based) the keys are the union of
      local    { p : t - W <= p <= t }                            (W = local_size)
      initial  { p : p < P, p <= t }                              (P = initial_size)
      dilated  { p : (p + 1) % D == 0, p >= P, p < t - W }        (D = dilation_size)

    ``dilation_size=1`` is dense causal attention (whatever W and P are); ``dilation_size=None`` drops
    the dilated part (local window + initial tokens only, the recurrence carries the rest).

    ``kind="topk"`` is inference-time top-k block attention: keys are grouped in blocks of
    ``block_size``; each query attends to its ``top_k`` best-scoring complete blocks older than the
    local window (scored Quest- or MoBA-style) plus the local window and initial tokens.

    ``kind="snapkv"`` is SnapKV KV eviction at inference (string ``snapkv-C<cache_size>-O<window>``):
    the prompt is attended densely (a full forward is plain causal attention); after the prefill the
    decoding cache keeps, per KV head, the ``cache_size`` prompt keys that the last ``window`` prompt
    queries attend to most (weights summed over those queries, max-pooled over ``SNAPKV_KERNEL``
    neighbours) plus those ``window`` keys; decoding continues over the kept keys and the new ones.
    """

    dilation_size: int | None = 1
    local_size: int = 0
    initial_size: int = 0
    kind: Literal["dilated", "topk", "snapkv"] = "dilated"
    block_size: int = 64
    top_k: int = 16
    scoring: TopKScoring = "quest"
    cache_size: int = 1024
    window: int = 64

    def __post_init__(self) -> None:
        for name in ("dilation_size", "local_size", "initial_size", "block_size", "top_k", "cache_size", "window"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_PATTERN_SIZE:
                raise ValueError(f"{name}={value} is beyond any context (at most {MAX_PATTERN_SIZE})")
        for name in ("block_size", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.kind not in ("dilated", "topk", "snapkv"):
            raise ValueError(f"kind must be 'dilated', 'topk' or 'snapkv', got {self.kind!r}")
        if self.kind == "snapkv":
            object.__setattr__(self, "dilation_size", None)
            for name in ("cache_size", "window"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} of a SnapKV pattern must be an int >= 1, got {value!r}")
            if self.cache_size < self.window:
                raise ValueError(
                    f"cache_size={self.cache_size} of a SnapKV pattern is below its observation window "
                    f"window={self.window}; SnapKV keeps at least the window"
                )
            if self.local_size or self.initial_size:
                raise ValueError("a SnapKV pattern takes no local_size / initial_size (its window is O<window>)")
            return
        if self.kind == "dilated":
            if self.dilation_size is not None:
                if isinstance(self.dilation_size, bool) or not isinstance(self.dilation_size, int):
                    raise ValueError(f"dilation_size must be an int >= 1 or None, got {self.dilation_size!r}")
                if self.dilation_size < 1:
                    raise ValueError(
                        f"dilation_size must be >= 1 (or None for no dilated keys), got {self.dilation_size}"
                    )
        else:
            if self.dilation_size is not None and self.dilation_size != 1:
                raise ValueError("dilation_size must be None for a top-k pattern")
            object.__setattr__(self, "dilation_size", None)
            if self.block_size < 1:
                raise ValueError(f"block_size must be >= 1, got {self.block_size}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0, got {self.top_k}")
            if self.scoring not in ("quest", "moba"):
                raise ValueError(f"scoring must be 'quest' or 'moba', got {self.scoring!r}")
        for name in ("local_size", "initial_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    # ---- properties ---------------------------------------------------------------------------
    @property
    def is_dense(self) -> bool:
        """True when every causal key is visible (D = 1)."""
        return self.kind == "dilated" and self.dilation_size == 1

    @property
    def is_topk(self) -> bool:
        return self.kind == "topk"

    @property
    def is_snapkv(self) -> bool:
        return self.kind == "snapkv"

    @property
    def inference_only(self) -> bool:
        """Top-k and SnapKV choose keys from scores at run time: a model is evaluated in them, never trained."""
        return self.is_topk or self.is_snapkv

    def kv_slots(self, seq_len: int) -> int:
        """Cache slots needed to decode at context ``seq_len``: P + W + 1 + floor(T / D) (docs/DESIGN.md 4).

        Dense needs T + 1; top-k keeps every key (it only skips work, not memory); SnapKV keeps
        min(T, cache_size + window) prompt keys (a prompt of T tokens) + 1.
        """
        if self.is_snapkv:
            return min(seq_len, self.cache_size + self.window) + 1
        if self.is_dense or self.is_topk:
            return seq_len + 1
        dilated = 0 if self.dilation_size is None else seq_len // self.dilation_size
        return self.initial_size + self.local_size + 1 + dilated

    def keys_per_query(self, t: int) -> int:
        """Exact |S(t)| for query position t (used for FLOP accounting; SnapKV's prefill is dense)."""
        if self.is_dense or self.is_snapkv:
            return t + 1
        W, P = self.local_size, self.initial_size
        n = min(W, t) + 1  # local
        n += max(0, min(P, t - W))  # initial keys not already in the window
        if self.is_topk:
            n_blocks = max(0, t - W - P) // self.block_size
            return n + min(self.top_k, n_blocks) * self.block_size
        if self.dilation_size is not None:
            D = self.dilation_size
            hi = t - W  # p < hi
            lo = P  # p >= lo
            if hi > lo:
                # count p in [lo, hi) with (p + 1) % D == 0  <=>  p + 1 in [lo + 1, hi] divisible by D
                n += hi // D - lo // D
        return n

    # ---- string form --------------------------------------------------------------------------
    def __str__(self) -> str:
        W, P = self.local_size, self.initial_size
        if self.is_snapkv:
            return f"snapkv-C{self.cache_size}-O{self.window}"
        if self.is_topk:
            return f"topk-B{self.block_size}-K{self.top_k}-W{W}-P{P}-{self.scoring}"
        if self.dilation_size is None:
            return f"local-W{W}-P{P}"
        if self.dilation_size == 1 and W == 0 and P == 0:
            return "dense"
        return f"D{self.dilation_size}-W{W}-P{P}"

    @classmethod
    def parse(cls, text: str) -> AttentionPattern:
        """Parse one pattern: ``dense``, ``D16``, ``D16-W256-P4``, ``local-W64-P4``,
        ``topk-B64-K16-W64-P4-quest``, ``snapkv-C1024-O64`` (fields after the head may come in any order, missing ones
        default to 0 / the dataclass default)."""
        if not isinstance(text, str):
            raise ValueError(f"pattern must be a string, got {type(text).__name__}")
        s = text.strip()
        low = s.lower()
        if low in ("dense", "causal", "full"):
            return cls()
        parts = s.split("-")
        head = parts[0]
        fields: dict[str, Any] = {}
        rest = parts[1:]
        if head.lower() == "local":
            fields["dilation_size"] = None
            if not any(re.fullmatch(r"[Ww][0-9]+", p) for p in rest):
                # bare "local" would attend to each query's own token only (plus P sinks): a typo, not a pattern
                raise ValueError(f"attention pattern {text!r} needs its window: local-W<w>[-P<p>], e.g. local-W64-P4")
        elif head.lower() == "topk":
            fields["kind"] = "topk"
            fields["dilation_size"] = None
        elif head.lower() == "snapkv":
            fields["kind"] = "snapkv"
        elif re.fullmatch(r"[Dd][0-9]+", head):
            fields["dilation_size"] = int(head[1:])
        else:
            raise ValueError(
                f"unknown attention pattern {text!r}: expected 'dense', 'D<d>[-W<w>][-P<p>]', "
                "'local-W<w>[-P<p>]', 'topk-B<b>-K<k>[-W<w>][-P<p>][-quest|-moba]' or 'snapkv-C<c>-O<o>'"
            )
        letters = {"W": "local_size", "P": "initial_size"}
        if fields.get("kind") == "topk":
            letters.update({"B": "block_size", "K": "top_k"})
        if fields.get("kind") == "snapkv":
            letters = {"C": "cache_size", "O": "window"}
        for part in rest:
            if fields.get("kind") == "topk" and part.lower() in ("quest", "moba"):
                if "scoring" in fields:
                    raise ValueError(f"conflicting scorings {fields['scoring']} and {part.lower()} in pattern {text!r}")
                fields["scoring"] = part.lower()
                continue
            m = re.fullmatch(r"([A-Za-z])([0-9]+)", part)
            if not m or m.group(1).upper() not in letters:
                raise ValueError(f"unknown field {part!r} in attention pattern {text!r}")
            name = letters[m.group(1).upper()]
            if name in fields:
                raise ValueError(f"field {part!r} given twice in attention pattern {text!r}")
            fields[name] = int(m.group(2))
        return cls(**fields)


@dataclass(frozen=True)
class HeadGroups:
    """Per-head mix within one layer: consecutive head groups, each with its own pattern.

    ``HeadGroups(((AttentionPattern(16), 4), (AttentionPattern(None, 64), 4)))`` gives heads 0-3 D=16
    and heads 4-7 a 64-token local window. String form: ``D16:4+local-W64-P0:4``.
    """

    groups: tuple[tuple[AttentionPattern, int], ...]

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("HeadGroups needs at least one group")
        for pattern, n in self.groups:
            if not isinstance(pattern, AttentionPattern):
                raise ValueError(f"HeadGroups entries must be AttentionPattern, got {type(pattern).__name__}")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"head count of a group must be >= 1, got {n!r}")

    @property
    def num_heads(self) -> int:
        return sum(n for _, n in self.groups)

    @property
    def is_dense(self) -> bool:
        return all(p.is_dense for p, _ in self.groups)

    def __str__(self) -> str:
        if len(self.groups) == 1:
            return str(self.groups[0][0])
        return "+".join(f"{p}:{n}" for p, n in self.groups)

    @classmethod
    def parse(cls, text: str, num_heads: int | None = None) -> HeadGroups:
        """Parse ``D16:4+local-W64:4``; a single pattern without ``:n`` takes all ``num_heads``."""
        items = [t for t in text.split("+")]
        if len(items) == 1 and ":" not in items[0]:
            if num_heads is None:
                raise ValueError("num_heads is needed to expand a single pattern into head groups")
            return cls(((AttentionPattern.parse(items[0]), num_heads),))
        groups = []
        for item in items:
            name, sep, count = item.rpartition(":")
            if not sep or not re.fullmatch(r"[0-9]+", count.strip()):
                raise ValueError(f"head group {item!r} in {text!r} must look like '<pattern>:<num_heads>'")
            groups.append((AttentionPattern.parse(name), int(count)))
        return cls(tuple(groups))


LayerPattern = HeadGroups
PatternSpec = None | str | AttentionPattern | HeadGroups | Sequence[str | AttentionPattern | HeadGroups]


def check_ints(obj: object, names: tuple[str, ...], minimum: int) -> None:
    """Each named field of ``obj`` must be an int (not a bool) >= ``minimum``: ValueError naming it."""
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
            raise ValueError(f"{name} must be {kind}, got {v!r}")


#: The largest learning rate a run accepts: AdamW moves every weight by about lr per step, so past 1
#: (weights start at std 0.02) a run can only diverge, which it would do silently or steps later.
MAX_LR = 1.0


def check_learning_rate(value: Any, name: str, allow_zero: bool = False) -> None:
    """``value`` must be a finite number in (0, MAX_LR] (``allow_zero``: [0, MAX_LR]): ValueError naming it."""
    real = is_real(value) and math.isfinite(value)
    if not (real and (value >= 0 if allow_zero else value > 0) and value <= MAX_LR):
        diverges = real and value > MAX_LR
        why = " (AdamW moves each weight by about lr per step: the run would diverge)" if diverges else ""
        low = "[0" if allow_zero else "(0"
        raise ValueError(f"{name} must be a finite number in {low}, {MAX_LR:g}], got {value!r}{why}")


def _one_layer(spec: str | AttentionPattern | HeadGroups, num_heads: int) -> HeadGroups:
    if isinstance(spec, HeadGroups):
        groups = spec
    elif isinstance(spec, AttentionPattern):
        groups = HeadGroups(((spec, num_heads),))
    elif isinstance(spec, str):
        groups = HeadGroups.parse(spec, num_heads)
    else:
        raise ValueError(f"pattern must be a string, AttentionPattern or HeadGroups, got {type(spec).__name__}")
    if groups.num_heads != num_heads:
        raise ValueError(f"pattern {groups} covers {groups.num_heads} heads but the layer has num_heads={num_heads}")
    return groups


def resolve_pattern(spec: PatternSpec, num_layers: int, num_heads: int) -> tuple[HeadGroups, ...]:
    """Canonical form of any pattern spec: one ``HeadGroups`` per layer.

    Strings may hold a per-layer list separated by ``/`` (``D16/dense``); its length must equal
    ``num_layers``.
    """
    if spec is None:
        spec = AttentionPattern()
    if isinstance(spec, str) and "/" in spec:
        spec = [s for s in spec.split("/")]
    if isinstance(spec, (str, AttentionPattern, HeadGroups)):
        layer = _one_layer(spec, num_heads)
        return (layer,) * num_layers
    if isinstance(spec, Sequence):
        if len(spec) != num_layers:
            raise ValueError(
                f"per-layer pattern list has {len(spec)} entries but the model has num_layers={num_layers}"
            )
        return tuple(_one_layer(s, num_heads) for s in spec)
    raise ValueError(f"cannot interpret pattern {spec!r}")


def pattern_to_str(layers: Sequence[HeadGroups]) -> str:
    """Inverse of ``resolve_pattern`` for printing: one pattern if all layers agree, else ``a/b/c``."""
    texts = [str(layer) for layer in layers]
    if len(set(texts)) == 1:
        return texts[0]
    return "/".join(texts)


# ---- model config ---------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Architecture of a RAT+ language model (docs/DESIGN.md section 2).

    ``apply_re=False`` gives the gated-attention baseline (no recurrence, in_proj packs o,q,k,v).
    ``num_kv_heads`` (None = ``num_heads``) < ``num_heads`` gives grouped-query attention (1 = multi-query):
    k, v (and the forget gate f) are projected for the KV heads only, the recurrence runs on them, and
    the queries of a group of ``num_heads / num_kv_heads`` consecutive heads share one KV head.
    ``max_seq_len`` bounds training/prefill length and RoPE positions; longer input raises.

    Imported Llama-family models (``ratplus.hf.llama``) need three more knobs, whose defaults are the
    paper's: ``ffn_act="swiglu"`` (fc2(silu(gate) * up), fc1 packing the gate rows then the up rows),
    ``ffn_dim`` (an explicit FFN width; None = ``ffn_mult * d_model``) and ``gate_bias`` (a learnable
    bias on the forget-gate logits, which uptraining sets very negative so the recurrence starts as an
    identity: docs/DESIGN.md section 9). ``rope_base`` is Llama's ``rope_theta``.
    """

    vocab_size: int = 32000
    d_model: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    max_seq_len: int = 4096
    num_kv_heads: int | None = None
    rope_base: float = 10000.0
    apply_re: bool = True
    tie_embeddings: bool = True
    ffn_mult: int = 4
    norm_eps: float = 1e-6
    init_std: float = 0.02
    eos_token_id: int | None = None
    ffn_act: Literal["gelu", "swiglu"] = "gelu"
    ffn_dim: int | None = None
    gate_bias: bool = False
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len", "ffn_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        kv = self.num_kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.num_heads % kv != 0:
            raise ValueError(
                f"num_kv_heads must be a positive int dividing num_heads={self.num_heads}, got {self.num_kv_heads!r}"
            )
        if self.d_model % self.num_heads != 0:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head dim d_model/num_heads={self.head_dim} must be even for RoPE")
        for name, low in (("rope_base", "> 0"), ("norm_eps", "> 0"), ("init_std", ">= 0")):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value) or value < 0 or (low == "> 0" and value == 0):
                raise ValueError(f"{name} must be a finite number {low}, got {value!r}")
        if self.ffn_act not in FFN_ACTS:
            raise ValueError(f"ffn_act must be one of {', '.join(FFN_ACTS)}, got {self.ffn_act!r}")
        dim = self.ffn_dim
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"ffn_dim must be a positive int or null (= ffn_mult x d_model), got {dim!r}")
        for name in ("apply_re", "tie_embeddings", "gate_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.gate_bias and not self.apply_re:
            raise ValueError("gate_bias is a bias of the forget gate: it needs apply_re=True")
        eos = self.eos_token_id
        if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int)):
            raise ValueError(f"eos_token_id must be an int or null, got {self.eos_token_id!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {self.name!r}")
        if self.eos_token_id is not None and not (0 <= self.eos_token_id < self.vocab_size):
            raise ValueError(f"eos_token_id={self.eos_token_id} is outside [0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_group(self) -> int:
        """Query heads per KV head (1 = plain multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def kv_dim(self) -> int:
        """Width of the k, v (and f) projections: num_kv_heads x K (= d_model without GQA)."""
        return self.num_kv_heads * self.head_dim

    @property
    def d_ffn(self) -> int:
        """FFN hidden width: ``ffn_dim``, else ``ffn_mult x d_model``."""
        return self.ffn_dim if self.ffn_dim is not None else self.ffn_mult * self.d_model

    def num_params(self) -> int:
        """Closed-form parameter count (tied head): V*C + L*(c*C^2 + 2C) + C (+ V*C if untied),
        with c = 5 + 1 + 2*ffn_mult for RAT+ (14 at ffn_mult 4) and one C^2 less for the baseline.
        With GQA the k, v (and f) rows of in_proj shrink from C to num_kv_heads x K each; SwiGLU has three
        FFN matrices instead of two; ``gate_bias`` adds num_kv_heads x K per layer."""
        C, V, L = self.d_model, self.vocab_size, self.num_layers
        in_rows = 2 * C + (3 if self.apply_re else 2) * self.kv_dim
        ffn_mats = 3 if self.ffn_act == "swiglu" else 2
        per_layer = in_rows * C + C * C + ffn_mats * self.d_ffn * C + 2 * C + (self.kv_dim if self.gate_bias else 0)
        total = V * C + L * per_layer + C
        if not self.tie_embeddings:
            total += V * C
        return total

    def resolve_pattern(self, spec: PatternSpec) -> tuple[HeadGroups, ...]:
        """One ``HeadGroups`` per layer; with GQA every head group must hold whole KV groups (its
        queries share KV heads, and the cache keeps one pattern per KV head)."""
        layers = resolve_pattern(spec, self.num_layers, self.num_heads)
        G = self.kv_group
        if G > 1:
            for layer in layers:
                if any(n % G for _, n in layer.groups):
                    raise ValueError(
                        f"pattern {layer} splits a KV group: with num_heads={self.num_heads} and "
                        f"num_kv_heads={self.num_kv_heads} every head group must be a multiple of {G} heads"
                    )
        return layers

    def canonical_pattern(self, spec: PatternSpec) -> str:
        """One printable form per distinct pattern of this architecture (``D16`` and ``D16-W0-P0``
        give the same string), used wherever a pattern is logged, recorded or compared.

        A spec that does not parse or does not fit the model raises ValueError naming it."""
        try:
            return pattern_to_str(self.resolve_pattern(spec))
        except ValueError as e:
            raise ValueError(f"bad attention pattern {spec!r}: {e}") from e

    def training_pattern(self, spec: PatternSpec, what: str = "pattern") -> str:
        """``canonical_pattern(spec)`` for a pattern a model can be *trained* in, else ValueError naming ``what``.

        Dense, dilated, local and hybrid patterns (and per-head / per-layer mixes of them) train: their key
        sets are fixed by position (docs/DESIGN.md section 3). Top-k blocks and SnapKV are inference-only:
        they choose keys from the scores at run time (top-k has no gradient through the choice; SnapKV
        only changes what a decode cache keeps, so a full forward in it is dense), so training "in" them
        would silently train something else."""
        try:
            text = self.canonical_pattern(spec)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from e
        for layer in self.resolve_pattern(spec):
            for p, _ in layer.groups:
                if p.inference_only:
                    raise ValueError(
                        f"{what} {text!r} is inference-only ({'top-k blocks' if p.is_topk else 'SnapKV'}): "
                        "training takes dense, dilated (D<d>[-W<w>][-P<p>]), local (local-W<w>[-P<p>]) or "
                        "mixes of them; adapt to one of those and evaluate the inference-only pattern on it"
                    )
        return text

    # ---- presets & serialisation --------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        values = dict(PRESETS[key])
        values.update(known_fields(cls, overrides))
        values.setdefault("name", key)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**known_fields(cls, data))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"model config not found: {p}")
        return cls.from_dict(read_json(p, "model config"))


def is_real(value: Any) -> bool:
    """A real number (int or float), not a bool or a string."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` checked to hold only fields of the dataclass ``cls`` (ValueError naming the others)."""
    if not isinstance(data, dict):
        raise ValueError(f"a {cls.__name__} must be a JSON object of fields, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return dict(data)


def read_json(path: Path, what: str = "") -> Any:
    """The JSON value in a file; a file that is not JSON raises ValueError naming it (``what`` first)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{what + ' ' if what else ''}{path} is not a text (UTF-8 JSON) file") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{what + ' ' if what else ''}{path} is not valid JSON: {e}") from e


#: Named presets. ``tiny`` is for tests, ``demo`` trains on 2 CPU cores (docs/DESIGN.md section 2: C=256, 4 layers,
#: T=512, about 4.7M parameters with a 4096-token vocabulary; ``demo-gqa``: the same with 2 KV heads), the last
#: three are the paper's sizes.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, d_model=32, num_layers=2, num_heads=4, max_seq_len=256),
    "demo": dict(vocab_size=4096, d_model=256, num_layers=4, num_heads=4, max_seq_len=512),
    "demo-gqa": dict(vocab_size=4096, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=512),
    "125m": dict(vocab_size=32000, d_model=768, num_layers=12, num_heads=12, max_seq_len=4096),
    "350m": dict(vocab_size=32000, d_model=1024, num_layers=24, num_heads=16, max_seq_len=4096),
    "1.5b": dict(vocab_size=32000, d_model=2048, num_layers=24, num_heads=16, max_seq_len=4096),
    "2.6b": dict(vocab_size=32000, d_model=2560, num_layers=28, num_heads=20, max_seq_len=4096),
    "7.6b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, max_seq_len=4096),
}

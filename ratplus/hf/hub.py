"""What an HF folder holds besides the weights: the tokenizer, a loader for the Auto classes and a
model card.

A RAT+ folder is loaded by the ``ratplus`` package, not by ``transformers`` alone (the attention
patterns, the compact cache and the scan are the package's code). Every folder ``save_pretrained``
writes makes that plain to whoever opens it:

* ``config.json`` carries ``auto_map`` pointing at ``modeling_ratplus.py``, a few lines written
  beside the weights that import the classes from the installed package. So
  ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works with ``ratplus``
  installed and nothing imported, and fails with an ``ImportError`` naming ``pip install
  'ratplus[hf]'`` without it. After ``import ratplus.hf`` (which registers ``model_type="ratplus"``)
  no ``trust_remote_code`` is needed: transformers prefers the registered classes. The file is a
  loader, not a second copy of the model: there is one implementation to trust and test.
* ``README.md``: a model card (library, install line, a usage snippet, the default attention pattern
  and architecture). An existing README that ratplus did not write is left alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ratplus.hf.configuration import RATPlusConfig

# Tokenizer files copied beside the weights when the model was loaded from a folder that had them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
LOADER_FILE = "modeling_ratplus.py"
CARD_FILE = "README.md"
INSTALL = "pip install 'ratplus[hf]'"
AUTO_MAP = {
    "AutoConfig": "modeling_ratplus.RATPlusConfig",
    "AutoModel": "modeling_ratplus.RATPlusModel",
    "AutoModelForCausalLM": "modeling_ratplus.RATPlusForCausalLM",
}
# Marks a README written here, so a save may replace it (and never a card the user wrote).
CARD_MARK = "<!-- model card written by ratplus; edit freely (it is then kept) -->"

LOADER = f'''"""Loader of this RAT+ model folder for transformers' Auto classes (trust_remote_code=True).

The model's code is the ratplus package: {INSTALL}
This file only imports its classes; it holds no model code of its own.
"""

try:
    from ratplus.hf import RATPlusConfig, RATPlusForCausalLM, RATPlusModel
except ImportError as e:
    raise ImportError(
        "this folder holds a RAT+ model (model_type 'ratplus'); its code is the ratplus package: "
        "{INSTALL}"
    ) from e

__all__ = ["RATPlusConfig", "RATPlusForCausalLM", "RATPlusModel"]
'''


def write_hub_files(folder: str | Path, config: RATPlusConfig) -> None:
    """Write the loader and (unless the folder has a README of its own) the model card."""
    out = Path(folder)
    (out / LOADER_FILE).write_text(LOADER)
    card = out / CARD_FILE
    if card.is_file() and CARD_MARK not in card.read_text(errors="replace"):
        return
    card.write_text(model_card(config))


def model_card(config: RATPlusConfig) -> str:
    """The README.md of a saved folder, from its config alone."""
    pattern = config.attention_pattern
    native = config.to_model_config()
    params = native.num_params()
    kind = "RAT+ (recurrence-augmented attention)" if config.apply_re else "gated attention (no recurrence)"
    adapted = (
        "dense causal attention (no sparse pattern recorded)"
        if pattern == "dense"
        else f"`{pattern}` (the pattern recorded when it was saved: adapted to, or chosen as the default)"
    )
    return f"""---
library_name: ratplus
pipeline_tag: text-generation
tags:
- ratplus
- recurrence-augmented-attention
---
{CARD_MARK}

# RAT+ model

A {kind} causal language model for the `ratplus` Python package: dense
attention for training, sparse attention patterns (dilated, local window, sinks, top-k) at inference
from the same weights.

- Default attention pattern: {adapted}. Any other pattern can be chosen after loading.
- Architecture: {config.num_layers} layers, width {config.d_model}, {config.num_heads} heads \
({config.num_kv_heads} KV heads), FFN {config.ffn_act} {config.intermediate_size}, vocabulary {config.vocab_size}, \
up to {config.max_seq_len} tokens, {params:,} parameters.

## Install

```bash
{INSTALL}
```

The model code is the ratplus package; transformers alone cannot run it.

## Use

```python
import ratplus.hf  # registers model_type "ratplus" with transformers' Auto classes
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")
model.set_attention_pattern("{pattern}")  # or "dense", "D16-W256-P4", ... without reloading
ids = tokenizer("Once upon a time", return_tensors="pt")
print(tokenizer.decode(model.generate(**ids, max_new_tokens=32)[0]))
```

Without the import, `AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", trust_remote_code=True)`
loads it through `modeling_ratplus.py`, which only imports the installed package. TRL's
`SFTTrainer(model="PATH_OR_REPO")` works after `import ratplus.hf`.
"""


def tokenizer_pad_id(source: Any, config: RATPlusConfig) -> int | None:
    """The id a tokenizer saved by ``save_tokenizer(source, ..., config)`` pads with: a ``transformers``
    tokenizer's own, a folder's (its tokenizer_config.json pad token looked up in tokenizer.json), or,
    for a raw ``tokenizers.Tokenizer``, the EOS that ``save_tokenizer`` makes the pad token. None when
    there is none."""
    if config.pad_token_id is not None:
        return config.pad_token_id
    if hasattr(source, "pad_token_id"):
        return source.pad_token_id
    from tokenizers import Tokenizer

    if isinstance(source, (str, Path)):
        folder = Path(source)
        try:
            pad = json.loads((folder / "tokenizer_config.json").read_text()).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            return None if pad is None else Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(pad)
        except Exception:  # no such files, or unreadable (tokenizers raises bare Exception): no pad id to record
            return None
    if isinstance(source, Tokenizer):
        eos = config.eos_token_id
        return eos if eos is not None and source.id_to_token(eos) is not None else None
    return None


def save_tokenizer(source: Any, save_directory: str | Path, config: RATPlusConfig | None = None) -> None:
    """Write a tokenizer into ``save_directory`` so ``AutoTokenizer.from_pretrained`` loads it.

    ``source``: a folder (its tokenizer files are copied), a ``transformers`` tokenizer, or a raw
    ``tokenizers.Tokenizer`` (wrapped in ``PreTrainedTokenizerFast`` with the config's special tokens;
    EOS doubles as the pad token when the config names none)."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        if folder.resolve() == out.resolve():
            return
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out / name)
        return
    if hasattr(source, "save_pretrained"):
        source.save_pretrained(str(out))
        return
    from tokenizers import Tokenizer

    if not isinstance(source, Tokenizer):
        raise ValueError(f"cannot save tokenizer of type {type(source).__name__}")
    from transformers import PreTrainedTokenizerFast

    special: dict[str, str] = {}
    if config is not None:
        for role in ("bos", "eos", "pad"):
            token_id = getattr(config, f"{role}_token_id")
            if token_id is not None and source.id_to_token(token_id) is not None:
                special[f"{role}_token"] = source.id_to_token(token_id)
    if "pad_token" not in special and "eos_token" in special:
        # Batching (pipeline, collators) needs a pad token; EOS is the usual stand-in for a model trained
        # without one (padded positions are masked, so which id fills them does not matter).
        special["pad_token"] = special["eos_token"]
    PreTrainedTokenizerFast(tokenizer_object=source, **special).save_pretrained(str(out))

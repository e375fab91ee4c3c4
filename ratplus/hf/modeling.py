"""``RATPlusForCausalLM``: the native RAT+ model behind the ``transformers`` API.

Shapes: B batch, T sequence length (new tokens when a cache is given), V vocab.

The wrapper holds a native ``ratplus.RATPlusLM`` under ``self.model`` (state-dict keys are the
native ones with a ``model.`` prefix) and adds what ``PreTrainedModel`` / ``GenerationMixin`` need:
``from_pretrained`` / ``save_pretrained`` (safetensors, tied head stored once), ``generate`` with
RAT+'s compact cache (``RATPlusHFCache``), an attention pattern stored in the config and switchable
after loading (``set_attention_pattern``), and HF-style ``labels`` (unshifted; shifted here).

Things the model cannot do it refuses with a ``ValueError`` rather than computing something else:
padding other than on the left of the prompt, ``inputs_embeds``, per-layer attention or hidden-state
outputs, a cache of another type, and loading a checkpoint with missing, unexpected or misshapen keys.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from ratplus.hf.cache import RATPlusHFCache
from ratplus.hf.configuration import RATPlusConfig, canonical_pattern
from ratplus.io.folder import state_dict_problems
from ratplus.model.rat import Block, RATPlusLM

# Tokenizer files copied beside the weights when the model was loaded from a folder that had them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# TransformersKwargs that ask for outputs this model does not produce.
_UNSUPPORTED_OUTPUTS = ("output_attentions", "output_hidden_states")
# Name under which `generate` passes the cache to `forward` and reads it back from the output:
# `cache` from transformers 5.24 on (`past_key_values` then warns as deprecated), `past_key_values`
# before. Taken from the output class itself, so any 5.x release gets the name it expects.
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RATPlusPreTrainedModel(PreTrainedModel):
    config: RATPlusConfig
    config_class = RATPlusConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = [Block.__name__]
    _skip_keys_device_placement: ClassVar[list[str]] = ["cache", "past_key_values"]
    # Decoding state lives in the compact cache and cannot be rolled back (no assisted decoding).
    _is_stateful = True
    _supported_generation_modes: ClassVar[list[GenerationMode]] = [
        GenerationMode.GREEDY_SEARCH,
        GenerationMode.SAMPLE,
        GenerationMode.BEAM_SEARCH,
        GenerationMode.BEAM_SAMPLE,
    ]


class RATPlusForCausalLM(RATPlusPreTrainedModel, GenerationMixin):
    """RAT+ causal LM for ``transformers`` (``AutoModelForCausalLM`` once ``ratplus.hf`` is imported).

    ``forward(input_ids (B, T) int64, ...)`` returns ``CausalLMOutputWithPast`` with logits (B, T, V)
    in the weights' dtype. The pattern is ``config.attention_pattern`` unless ``attention_pattern=``
    is given to ``forward`` / ``generate``.
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.head.lm_head.weight": "model.embedding.wte.weight"}

    def __init__(self, config: RATPlusConfig):
        super().__init__(config)
        self.model = RATPlusLM(config.to_model_config())
        self._tokenizer_source: Any = None  # a folder to copy tokenizer files from, or a tokenizer object
        self.post_init()

    # ---- embeddings (PreTrainedModel API) -----------------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embedding.wte

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embedding.wte = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.head.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.head.lm_head = value

    # ---- attention pattern --------------------------------------------------------------------
    @property
    def attention_pattern(self) -> str:
        return self.config.attention_pattern

    def set_attention_pattern(self, pattern: Any) -> str:
        """Switch the default attention pattern (any pattern spec) without reloading; returns its
        canonical string. Raises ValueError when it does not parse or does not fit the model."""
        self.config.attention_pattern = canonical_pattern(pattern, self.model.config)
        return self.config.attention_pattern

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: RATPlusHFCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        attention_pattern: str | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids (B, T) int64. With ``cache`` (a ``RATPlusHFCache``; ``past_key_values`` is the
        same argument under its pre-5.24 name) the tokens continue after the cached ones and only
        their logits (B, T, V) come back.

        ``use_cache=True`` without a cache starts one (sized to this input; it grows in chunks when
        later calls continue) and returns it.
        ``labels`` (B, T) follow the ``transformers`` convention: the same ids as ``input_ids``
        (-100 = ignore), shifted here; ``loss`` is the mean next-token cross-entropy in float32.
        ``attention_mask`` (B, T) or (B, cached + T): 0 marks left padding of the prompt (padding
        anywhere else raises); each row then runs exactly as it would alone."""
        hf_cache = self._take_cache(cache, kwargs)
        self._check_inputs(input_ids, kwargs)
        if attention_mask is not None and bool((attention_mask == 1).all()):
            attention_mask = None  # no padding: the plain path
        if attention_pattern is None:
            pattern = self.config.attention_pattern
        else:
            pattern = canonical_pattern(attention_pattern, self.model.config)
        if hf_cache is None and use_cache:
            hf_cache = RATPlusHFCache()
        if hf_cache is None and attention_mask is None:
            logits = self.model(input_ids, pattern=pattern)
        elif hf_cache is None:
            # Left padding is handled by the compact cache (per-row positions, pads skipped by the
            # recurrence); a throwaway one sized to this input gives the padded full forward.
            logits = RATPlusHFCache(max_len=input_ids.shape[1]).run(self.model, input_ids, pattern, attention_mask)
        elif isinstance(hf_cache, RATPlusHFCache):
            logits = hf_cache.run(self.model, input_ids, pattern, attention_mask)
        else:
            raise ValueError(
                f"the cache must be a RATPlusHFCache (RAT+ keeps its own compact cache), got {type(hf_cache).__name__}"
            )
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KWARG: hf_cache})
        if return_dict is False:
            return out.to_tuple()
        return out

    @staticmethod
    def _take_cache(cache: RATPlusHFCache | None, kwargs: dict[str, Any]) -> RATPlusHFCache | None:
        """The cache under either name (``cache``, or ``past_key_values`` as transformers < 5.24 and
        older user code pass it); both at once must be the same object."""
        old = kwargs.pop("past_key_values", None)
        if cache is not None and old is not None and old is not cache:
            raise ValueError("pass the cache once: as cache= (or past_key_values=, its older name), not both")
        return cache if cache is not None else old

    @staticmethod
    def _check_inputs(input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> None:
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported by RAT+; pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if kwargs.get("position_ids") is not None:
            raise ValueError("position_ids is not supported: positions follow the tokens (and the attention_mask)")
        for name in _UNSUPPORTED_OUTPUTS:
            if kwargs.get(name):
                raise ValueError(f"{name}=True is not supported by RATPlusForCausalLM")

    # ---- generation ---------------------------------------------------------------------------
    def _prepare_cache_for_generation(
        self,
        generation_config,
        model_kwargs: dict[str, Any],
        generation_mode,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """Give ``generate`` RAT+'s compact cache instead of a ``DynamicCache`` (under the name the
        installed transformers uses, ``CACHE_KWARG``)."""
        user_cache = model_kwargs.get(CACHE_KWARG)
        if user_cache is not None:
            if not isinstance(user_cache, RATPlusHFCache):
                raise ValueError(f"the cache must be a RATPlusHFCache, got {type(user_cache).__name__}")
            if generation_config.cache_implementation is not None:
                raise ValueError(f"pass either {CACHE_KWARG} or cache_implementation, not both")
            user_cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported: "
                "RAT+ always decodes with its own compact cache"
            )
        model_kwargs[CACHE_KWARG] = RATPlusHFCache(max_len=max_cache_length)

    # ---- saving -------------------------------------------------------------------------------
    def attach_tokenizer(self, tokenizer: Any) -> None:
        """Remember the tokenizer used with this model so ``save_pretrained`` writes it beside the
        weights: a ``tokenizers.Tokenizer``, a ``transformers`` tokenizer, or a folder holding one."""
        self._tokenizer_source = tokenizer

    def save_pretrained(self, save_directory: str | Path, *args: Any, tokenizer: Any = None, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained`` (config.json, model.safetensors, generation_config.json)
        plus the tokenizer (``tokenizer=`` or the attached one) saved beside it."""
        super().save_pretrained(save_directory, *args, **kwargs)
        source = tokenizer if tokenizer is not None else self._tokenizer_source
        if source is not None:
            save_tokenizer(source, save_directory, self.config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained`` that refuses a checkpoint whose keys or shapes do not
        match the config (``transformers`` would only warn and initialise the rest at random)."""
        want_info = kwargs.pop("output_loading_info", False)
        if kwargs.get("ignore_mismatched_sizes"):
            raise ValueError("ignore_mismatched_sizes is not supported: a RAT+ checkpoint must match its config")
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir() and not kwargs.get("subfolder"):
            # Checked before loading: transformers reports some mismatches only as log lines (and, for a
            # missing tied embedding, not at all) while initialising the weights at random.
            config = kwargs.get("config")
            if not isinstance(config, RATPlusConfig):
                config = RATPlusConfig.from_pretrained(folder)
            check_checkpoint_folder(folder, config)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = []
        for name in ("missing_keys", "unexpected_keys"):
            keys = sorted(info.get(name) or ())
            if keys:
                problems.append(f"{name.replace('_', ' ')}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        mismatched = sorted(info.get("mismatched_keys") or ())
        if mismatched:
            problems.append("shape mismatches: " + "; ".join(f"{k}: {a} vs {b}" for k, a, b in mismatched[:8]))
        if info.get("error_msgs"):
            problems.append("errors: " + "; ".join(info["error_msgs"][:4]))
        if problems:
            raise ValueError(
                f"checkpoint {pretrained_model_name_or_path} does not match its config: " + " | ".join(problems)
            )
        native = model.model
        if native.config.tie_embeddings and native.head.lm_head.weight is not native.embedding.wte.weight:
            raise ValueError(
                f"checkpoint {pretrained_model_name_or_path} stores an LM head that differs from the embedding "
                "but its config says tie_embeddings=true"
            )
        if folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES):
            model._tokenizer_source = folder
        return (model, info) if want_info else model


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of the safetensors weights in a model folder (headers only, nothing loaded);
    None when the folder has no safetensors weights."""
    from safetensors import safe_open

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"weights index {index} is not valid: {e}") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises several types for damaged files
            raise ValueError(f"cannot read weights {path}: the file is truncated or corrupt ({e})") from e
    return shapes


def expected_shapes(config: RATPlusConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every weight ``RATPlusForCausalLM(config)`` holds (built on the meta device)."""
    with torch.device("meta"):
        native = RATPlusLM(config.to_model_config())
    return {f"{RATPlusPreTrainedModel.base_model_prefix}.{k}": tuple(v.shape) for k, v in native.state_dict().items()}


def check_checkpoint_folder(folder: Path, config: RATPlusConfig) -> None:
    """Raise ValueError naming missing, unexpected and misshapen keys of a folder's weights."""
    found = checkpoint_shapes(folder)
    if found is None:
        return
    expected = expected_shapes(config)
    optional = {"model.head.lm_head.weight"} if config.tie_embeddings else set()
    problems = state_dict_problems(expected, found, optional)
    if problems:
        raise ValueError(f"weights in {folder} do not match its config.json: " + " | ".join(problems))


def save_tokenizer(source: Any, save_directory: str | Path, config: RATPlusConfig | None = None) -> None:
    """Write a tokenizer into ``save_directory`` so ``AutoTokenizer.from_pretrained`` loads it.

    ``source``: a folder (its tokenizer files are copied), a ``transformers`` tokenizer, or a raw
    ``tokenizers.Tokenizer`` (wrapped in ``PreTrainedTokenizerFast`` with the config's special tokens)."""
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
    PreTrainedTokenizerFast(tokenizer_object=source, **special).save_pretrained(str(out))

"""``RATPlusModel`` / ``RATPlusForCausalLM``: the native RAT+ model behind the ``transformers`` API.

Shapes: B batch, T sequence length (new tokens when a cache is given), C model width, V vocab.

``RATPlusModel`` is the backbone (embeddings, blocks, final norm; ``last_hidden_state`` (B, T, C))
and ``RATPlusForCausalLM`` puts the LM head on it, the layout ``Trainer``, TRL and PEFT expect.
Both run the native ``ratplus.RATPlusLM`` code: the backbone holds the native model's modules under
their native names (``embedding``, ``backbone``, ``head``; the head sits here only so checkpoint keys
stay ``model.`` + the native keys of every earlier release) and keeps the native model itself, which
shares those modules, as ``.native`` (not a submodule: no key appears twice).

What HF adds: ``from_pretrained`` / ``save_pretrained`` (safetensors, tied head stored once),
``generate`` with RAT+'s compact cache (``RATPlusHFCache``), an attention pattern stored in the
config and switchable after loading (``set_attention_pattern``), HF-style ``labels`` (unshifted),
padding anywhere in training (``attention_mask``), packed sequences (``position_ids`` restarting at
0), ``inputs_embeds``, ``output_hidden_states``, and transformers' gradient checkpointing (the blocks
are ``GradientCheckpointingLayer`` s: ``RATPlusBlock``).

Things the model cannot do it refuses with a ``ValueError`` rather than computing something else:
attention-weight outputs (RAT+ never forms the attention matrix), a cache of another type, labels
with the inference-only cache while gradients are on, and loading a checkpoint with missing,
unexpected or misshapen keys.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ratplus.hf.cache import RATPlusHFCache
from ratplus.hf.configuration import RATPlusConfig, canonical_pattern
from ratplus.hf.hub import AUTO_MAP, TOKENIZER_FILES, save_tokenizer, tokenizer_pad_id, write_hub_files
from ratplus.io.folder import state_dict_problems
from ratplus.io.manifest import MANIFEST_FILE, verify_folder
from ratplus.model.rat import Block, RATPlusLM

# Name under which `generate` passes the cache to `forward` and reads it back from the output:
# `cache` from transformers 5.24 on (`past_key_values` then warns as deprecated), `past_key_values`
# before. Taken from the output class itself, so any 5.x release gets the name it expects.
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _take_cache(cache: RATPlusHFCache | None, kwargs: dict[str, Any]) -> RATPlusHFCache | None:
    """The cache under either name (``cache``, or ``past_key_values`` as transformers < 5.24 and
    older user code pass it); both at once must be the same object."""
    old = kwargs.pop("past_key_values", None)
    if cache is not None and old is not None and old is not cache:
        raise ValueError("pass the cache once: as cache= (or past_key_values=, its older name), not both")
    return cache if cache is not None else old


class RATPlusBlock(Block, GradientCheckpointingLayer):
    """The native ``Block``, as a ``GradientCheckpointingLayer``: ``gradient_checkpointing_enable()``
    (Trainer, TRL, PEFT) recomputes it in backward with transformers' checkpoint function and options.
    ``RATPlusModel.attach`` turns the native blocks into this class in place (no new module, no copy;
    the native model sharing them runs them as before while the flag is off). The native
    ``RATPlusLM.set_activation_checkpointing`` is the native trainer's mechanism; turn on one, not both."""


class RATPlusPreTrainedModel(PreTrainedModel):
    config: RATPlusConfig
    config_class = RATPlusConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # Gradient checkpointing is transformers' own: every block is a GradientCheckpointingLayer (RATPlusBlock).
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = [RATPlusBlock.__name__, Block.__name__]
    _skip_keys_device_placement: ClassVar[list[str]] = ["cache", "past_key_values"]
    # Decoding state lives in the compact cache and cannot be rolled back (no assisted decoding).
    _is_stateful = True
    _supported_generation_modes: ClassVar[list[GenerationMode]] = [
        GenerationMode.GREEDY_SEARCH,
        GenerationMode.SAMPLE,
        GenerationMode.BEAM_SEARCH,
        GenerationMode.BEAM_SAMPLE,
    ]

    @property
    def native(self) -> RATPlusLM:
        """The native ``RATPlusLM`` (shares every weight with this model)."""
        return self.base_model.__dict__["_native"]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """Every ``.to()`` / ``.half()`` / ``.bfloat16()`` ends here: keep ``config.dtype`` (saved in
        config.json, read back by ``from_pretrained(dtype="auto")``) equal to the weights' dtype."""
        out = super()._apply(fn, recurse)
        weight = next((p for p in self.parameters() if p.is_floating_point()), None)
        if weight is not None and getattr(self, "config", None) is not None:
            self.config.dtype = weight.dtype
        return out

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> torch.nn.Embedding:
        """``PreTrainedModel.resize_token_embeddings``, keeping the native config's vocab_size in step
        (the new ids are accepted at once, not only after a save and reload)."""
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        native = self.native
        native.config = dataclasses.replace(native.config, vocab_size=embeddings.num_embeddings)
        self.config.vocab_size = embeddings.num_embeddings
        return embeddings

    def _check_attention_pattern(self, attention_pattern: Any) -> str:
        if attention_pattern is None:
            return self.config.attention_pattern
        return canonical_pattern(attention_pattern, self.native.config)


class RATPlusModel(RATPlusPreTrainedModel):
    """The RAT+ backbone: ``forward(input_ids (B, T) int64, ...)`` returns ``BaseModelOutputWithPast``
    with ``last_hidden_state`` (B, T, C) after the final norm, and ``hidden_states`` (the embeddings
    and each block's output, the last one normed) when asked."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"head.lm_head.weight": "embedding.wte.weight"}

    def __init__(self, config: RATPlusConfig):
        super().__init__(config)
        native = RATPlusLM(config.to_model_config())
        # Untied here, tied again by post_init (from _tied_weights_keys): transformers' loader must see two
        # parameters to materialise a missing tied embedding, as for its own models.
        native.head.lm_head.weight = torch.nn.Parameter(torch.empty_like(native.head.lm_head.weight))
        self.attach(native)
        self.post_init()
        # Patterns known to train, checked once each in eager code: the check parses pattern strings,
        # which torch.compile cannot trace for head-group patterns (a graph break in every training forward).
        self._trainable: set[str] = set()
        self.note_trainable(config.attention_pattern)

    def note_trainable(self, pattern: str) -> None:
        """Remember ``pattern`` (canonical) as trainable when it is (inference-only ones are not noted)."""
        try:
            self.native.config.training_pattern(pattern, "attention_pattern")
        except ValueError:
            return
        self._trainable.add(pattern)

    # transformers' _set_gradient_checkpointing sets this flag here and on every RATPlusBlock
    gradient_checkpointing = False

    def attach(self, native: RATPlusLM) -> None:
        """Take the native model's modules as this model's (shared, not copied); its blocks become
        ``RATPlusBlock`` (the same modules and weights, now a ``GradientCheckpointingLayer``)."""
        for block in native.backbone.layers:
            if type(block) is Block:
                block.__class__ = RATPlusBlock
        self.embedding, self.backbone, self.head = native.embedding, native.backbone, native.head
        object.__setattr__(self, "_native", native)  # a plain attribute: its weights are registered above

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embedding.wte

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.embedding.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RATPlusHFCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        attention_pattern: str | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids (B, T) int64, or inputs_embeds (B, T, C) (without a cache).

        ``cache`` (a ``RATPlusHFCache``; ``past_key_values`` is its pre-5.24 name): the tokens continue
        after the cached ones; ``use_cache=True`` without one starts one. The cache is inference-only
        (it runs without gradients) and takes left padding only.
        ``attention_mask`` (B, T), 0 = padding: without a cache, padding may be anywhere; each row runs
        as its unmasked tokens alone (outputs at padded positions are unspecified).
        ``position_ids`` (B, T): positions follow the tokens; a 0 after the first token starts a new
        packed sequence that runs as if alone (TRL's padding-free packing). Other values are not used.
        Other keyword arguments of HF's attention kernels (``cu_seq_lens_q``, ...) are ignored."""
        hf_cache = _take_cache(cache, kwargs)
        if output_attentions:
            raise ValueError("output_attentions=True is not supported: RAT+ never forms attention weight matrices")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        pattern = self._check_attention_pattern(attention_pattern)
        if hf_cache is None and use_cache:
            hf_cache = RATPlusHFCache()
        if hf_cache is not None and not isinstance(hf_cache, RATPlusHFCache):
            raise ValueError(
                f"the cache must be a RATPlusHFCache (RAT+ keeps its own compact cache), got {type(hf_cache).__name__}"
            )
        record: list[torch.Tensor] | None = [] if output_hidden_states else None
        native = self.native
        if self.training and hf_cache is None and torch.is_grad_enabled() and pattern not in self._trainable:
            native.config.training_pattern(pattern, "attention_pattern")  # top-k / SnapKV do not train
            self._trainable.add(pattern)
        if hf_cache is not None:
            if inputs_embeds is not None:
                raise ValueError("inputs_embeds is not supported with a cache (use_cache=True); pass input_ids")
            native.check_ids(input_ids, values=False)
            h = hf_cache.run(native, input_ids, pattern, attention_mask, all_hidden=record)
        else:
            starts = None if position_ids is None else _packed_starts(position_ids, attention_mask)
            if starts is None:
                h = native.hidden(
                    input_ids, pattern, inputs_embeds=inputs_embeds, attention_mask=attention_mask, all_hidden=record
                )
            else:
                if inputs_embeds is None:
                    native.check_ids(input_ids)
                    inputs_embeds = self.embedding.wte(input_ids)
                h = _run_packed(native, inputs_embeds, starts, attention_mask, pattern, record)
            if attention_mask is not None and attention_mask.shape == h.shape[:2]:
                # A masked position has no context of its own: zero state, so its logits are all 0 (a
                # uniform prediction) and a target after padding, which ForCausalLMLoss counts as a Llama
                # does, costs log V and trains nothing; it never sees the row's later tokens.
                h = h.masked_fill(~attention_mask.bool().unsqueeze(-1), 0.0)
        h = self.backbone.ln(h)
        hidden_states = None
        if record is not None:
            hidden_states = (*record[:-1], h)
        out = BaseModelOutputWithPast(last_hidden_state=h, hidden_states=hidden_states, **{CACHE_KWARG: hf_cache})
        return out.to_tuple() if return_dict is False else out


def _packed_starts(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) bool: where each packed sequence starts (a row's first token, and every later token at
    position 0), or None when no row holds more than one sequence. Reads one bool on the host: only
    batches that pass position_ids pay for it."""
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    keep = torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if keep.shape != position_ids.shape:
        raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != attention_mask shape {tuple(keep.shape)}")
    first = keep & (keep.cumsum(1) == 1)
    later = (position_ids == 0) & keep & ~first
    if not bool(later.any()):
        return None
    return first | later


def _run_packed(
    native: RATPlusLM, x: torch.Tensor, starts: torch.Tensor, attention_mask, pattern, record
) -> torch.Tensor:
    """Run each packed sequence of x (B, T, C) as its own row: regroup the tokens into (N, L, C), N
    sequences right-padded to the longest L, run them, and put the outputs back (zeros at masked
    positions). Exact per sequence, for every pattern, with gradients."""
    B, T, C = x.shape
    keep = torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask.bool()
    flat_keep = keep.flatten()  # (B*T,)
    flat_start = starts.flatten() & flat_keep  # (B*T,)
    rank = flat_keep.cumsum(0) - 1  # (B*T,) rank of each kept token among the kept ones
    seq = flat_start.cumsum(0) - 1  # (B*T,) sequence of each kept token
    first = torch.where(flat_start, rank, -1).cummax(0).values  # rank of the start of its sequence
    offset = rank - first  # (B*T,) position inside its sequence (kept tokens)
    # Every shape above is static; the regrouped batch's size is not: one host read for both sizes
    # (the one graph break of a packed batch under torch.compile).
    sizes = torch.stack([flat_start.sum(), offset.masked_fill(~flat_keep, 0).max() + 1])
    N, L = (int(v) for v in sizes.tolist())
    row = torch.where(flat_keep, seq, N)  # masked tokens go to a spare row N, never run
    col = torch.where(flat_keep, offset, 0)
    index = torch.zeros(N + 1, L, dtype=torch.long, device=x.device)
    index[row, col] = torch.arange(B * T, device=x.device)
    flat = x.reshape(B * T, C)
    parts: list[torch.Tensor] | None = [] if record is not None else None
    h = native.hidden(None, pattern, inputs_embeds=flat[index[:N]], all_hidden=parts)  # (N, L, C)
    dead = ~flat_keep.unsqueeze(-1)  # (B*T, 1)
    back = lambda t: t[row.clamp(max=N - 1), col].masked_fill(dead, 0.0).view(B, T, C)  # noqa: E731
    if record is not None:
        record.extend(back(t) for t in parts)
    return back(h)


class RATPlusForCausalLM(RATPlusPreTrainedModel, GenerationMixin):
    """RAT+ causal LM for ``transformers`` (``AutoModelForCausalLM`` once ``ratplus.hf`` is imported).

    ``forward(input_ids (B, T) int64, ...)`` returns ``CausalLMOutputWithPast`` with logits (B, T, V)
    in the weights' dtype. The pattern is ``config.attention_pattern`` unless ``attention_pattern=``
    is given to ``forward`` / ``generate``.
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.head.lm_head.weight": "model.embedding.wte.weight"}

    def __init__(self, config: RATPlusConfig):
        super().__init__(config)
        self.model = RATPlusModel(config)
        self._tokenizer_source: Any = None  # a folder to copy tokenizer files from, or a tokenizer object
        self._decode_core: Any = None  # compile_decode()'s compiled fixed-shape step, handed to new caches
        self.post_init()

    # ---- embeddings (PreTrainedModel API) -----------------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embedding.wte

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embedding.wte = value

    @property
    def lm_head(self) -> torch.nn.Linear:
        """The LM head (``model.head.lm_head``; the attribute name transformers, PEFT and TRL read). It is
        a view of the backbone's module, so its weight is stored once, under the native key."""
        return self.model.head.lm_head

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "lm_head":  # nn.Module would register a second module; replace the real one instead
            self.set_output_embeddings(value)
            return
        super().__setattr__(name, value)

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.head.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.head.lm_head = value

    def get_decoder(self) -> RATPlusModel:
        return self.model

    # ---- attention pattern --------------------------------------------------------------------
    @property
    def attention_pattern(self) -> str:
        return self.config.attention_pattern

    def set_attention_pattern(self, pattern: Any) -> str:
        """Switch the default attention pattern (any pattern spec) without reloading; returns its
        canonical string. Raises ValueError when it does not parse or does not fit the model."""
        self.config.attention_pattern = canonical_pattern(pattern, self.native.config)
        self.model.note_trainable(self.config.attention_pattern)
        return self.config.attention_pattern

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RATPlusHFCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        attention_pattern: str | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """As ``RATPlusModel.forward``, plus the LM head: logits (B, T, V).

        ``labels`` (B, T) follow the ``transformers`` convention and its ``ForCausalLMLoss``: the same
        ids as ``input_ids`` (-100 = ignore), shifted here (or ``shift_labels`` given), every target
        != -100 counted, as for a Llama; ``loss`` is the mean next-token cross-entropy in float32, or the
        sum divided by ``num_items_in_batch`` when ``Trainer`` passes it. A masked position's logits are
        all zero (it has no context), so the first target after left padding costs exactly log V and
        has no gradient; every other target is the row's own, run alone.

        ``logits_to_keep`` as in Llama: an int n > 0 keeps the logits of the last n positions
        (``generate`` passes 1), a 1-D tensor the positions it lists; 0 keeps all. The LM head runs on
        those positions only, and labels must then match the kept logits. Labels with the
        inference-only cache (``use_cache=True``) are refused while gradients are on."""
        hf_cache = _take_cache(cache, kwargs)
        if labels is not None and (hf_cache is not None or use_cache) and torch.is_grad_enabled():
            raise ValueError(
                "labels with a cache (use_cache=True): the compact cache is inference-only and runs without "
                "gradients, so this loss could not train the model; pass use_cache=False (or run under torch.no_grad())"
            )
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "shift_labels") if k in kwargs}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=hf_cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            attention_pattern=attention_pattern,
            **kwargs,
        )
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, torch.Tensor)):
            raise ValueError(f"logits_to_keep must be an int or a tensor of positions, got {logits_to_keep!r}")
        if isinstance(logits_to_keep, int) and logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 = every position), got {logits_to_keep}")
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels shape {tuple(labels.shape)} != kept logits {tuple(logits.shape[:2])}")
            # transformers' ForCausalLMLoss on the labels alone, as for a Llama: the targets are the ones
            # Trainer counts for num_items_in_batch (labels[..., 1:] != -100), so the sum it divides matches.
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **loss_kwargs)
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_KWARG: getattr(out, CACHE_KWARG)}
        )
        return result.to_tuple() if return_dict is False else result

    # ---- generation ---------------------------------------------------------------------------
    def _prepare_generated_length(
        self,
        generation_config,
        has_default_max_length,
        has_default_min_length,
        model_input_name,
        input_ids_length,
        inputs_tensor,
    ):
        """As ``GenerationMixin``, then cap prompt + new tokens at ``max_seq_len`` (RoPE's and the
        cache's limit), as ``ratplus.generate`` does: generation stops there instead of failing."""
        generation_config = super()._prepare_generated_length(
            generation_config,
            has_default_max_length,
            has_default_min_length,
            model_input_name,
            input_ids_length,
            inputs_tensor,
        )
        limit = self.config.max_seq_len
        if input_ids_length >= limit:
            raise ValueError(
                f"the prompt has {input_ids_length} tokens: no room to generate within max_seq_len={limit}"
            )
        generation_config.max_length = min(generation_config.max_length, limit)
        return generation_config

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
        model_kwargs[CACHE_KWARG] = RATPlusHFCache(
            max_len=min(max_cache_length, self.config.max_seq_len), decode_core=self._decode_core
        )

    def compile_decode(self, enable: bool = True, **compile_kwargs: Any) -> RATPlusForCausalLM:
        """Decode ``generate()``'s one-token steps with ``torch.compile(native.decode_step_hidden,
        fullgraph=True, dynamic=False, **compile_kwargs)``: the fixed-shape step (positions as a tensor,
        slot writes by index tensors, a mask over every slot), one graph for every step of a cache size.
        Compiling ``model.forward`` instead traces the general cached forward, whose host bookkeeping
        (Python ints per row) changes every step: it recompiles each step until Dynamo's limit, then
        runs eager. Top-k patterns keep the eager step. ``enable=False`` goes back to eager."""
        if not enable:
            self._decode_core = None
            return self
        options = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        self._decode_core = torch.compile(self.native.decode_step_hidden, **options)
        return self

    # ---- saving -------------------------------------------------------------------------------
    def attach_tokenizer(self, tokenizer: Any) -> None:
        """Remember the tokenizer used with this model so ``save_pretrained`` writes it beside the
        weights: a ``tokenizers.Tokenizer``, a ``transformers`` tokenizer, or a folder holding one."""
        self._tokenizer_source = tokenizer

    def save_pretrained(self, save_directory: str | Path, *args: Any, tokenizer: Any = None, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained`` (config.json, model.safetensors, generation_config.json)
        plus the tokenizer (``tokenizer=`` or the attached one) saved beside it, the loader named by
        ``auto_map`` and a model card (``ratplus.hf.hub``)."""
        source = tokenizer if tokenizer is not None else self._tokenizer_source
        if source is not None and self.config.pad_token_id is None:
            # the id the saved tokenizer pads with, so batching in generate and pipelines needs no argument
            pad = tokenizer_pad_id(source, self.config)
            if pad is not None:
                self.config.pad_token_id = pad
                if self.generation_config is not None and self.generation_config.pad_token_id is None:
                    self.generation_config.pad_token_id = pad
        self.config.auto_map = dict(AUTO_MAP)  # the loader written below (ratplus.hf.hub)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_hub_files(save_directory, self.config)
        if source is not None:
            save_tokenizer(source, save_directory, self.config)
        # A manifest of an earlier write (``convert`` signs its folders) no longer describes these
        # files: it goes. No new one: a Trainer, or transformers' own tools, write their files and
        # rewrite ours after this save; from_pretrained loads a folder without a manifest as it is.
        (Path(save_directory) / MANIFEST_FILE).unlink(missing_ok=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None, *args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained`` that refuses a checkpoint whose keys or shapes do not
        match the config (``transformers`` would only warn and initialise the rest at random), unless
        ``output_loading_info=True``: the caller then gets ``(model, info)`` and reads the missing,
        unexpected and mismatched keys there (the keys missing are initialised at random, as in transformers).
        ``None`` with ``config=`` and ``state_dict=`` builds the model from those, as in transformers."""
        want_info = kwargs.pop("output_loading_info", False)
        verify = kwargs.pop("verify", None)  # sha256 | size | off (ratplus.io.manifest), default $RATPLUS_VERIFY
        if kwargs.get("ignore_mismatched_sizes"):
            raise ValueError("ignore_mismatched_sizes is not supported: a RAT+ checkpoint must match its config")
        folder = None if pretrained_model_name_or_path is None else Path(pretrained_model_name_or_path)
        if folder is not None and folder.is_dir() and not kwargs.get("subfolder"):
            # a folder with a manifest (convert writes one) is checked as a native folder is: an edited
            # config.json or a truncated weights file is refused; a folder without one loads as it is
            verify_folder(folder, verify, require=False)
        if folder is not None and folder.is_dir() and not kwargs.get("subfolder") and not want_info:
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
        if problems and not want_info:
            raise ValueError(
                f"checkpoint {pretrained_model_name_or_path} does not match its config: " + " | ".join(problems)
            )
        native = model.native
        if problems:  # output_loading_info=True: the caller asked for the report instead of the refusal
            return model, info
        if native.config.tie_embeddings and native.head.lm_head.weight is not native.embedding.wte.weight:
            raise ValueError(
                f"checkpoint {pretrained_model_name_or_path} stores an LM head that differs from the embedding "
                "but its config says tie_embeddings=true"
            )
        if folder is not None and folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES):
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

"""A ``transformers`` ``Cache`` around RAT+'s compact decoding cache.

Shapes: B batch, T new tokens per call.

RAT+ layers do not hand key/value tensors to the cache (``Cache.update``): the native model writes
its own compact cache (P initial slots, a W-token ring, the dilated keys, the recurrent state; see
``ratplus.model.cache``). This wrapper only gives ``GenerationMixin`` what it asks of a cache:
``get_seq_length()`` (tokens seen so far), beam reordering (``reorder_cache`` -> ``select``),
``reset``. The inner ``RATPlusCache`` is built on the first forward, when the batch size, device
and dtype are known (``generate`` expands the batch for beams / ``num_return_sequences`` before
the first forward, so building it earlier would get the batch size wrong).

What a compact cache cannot do it refuses: ``crop`` (tokens already folded into the recurrence
cannot be taken back, so assisted decoding is unsupported) and ``update`` (nothing calls it here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache

from ratplus.model.cache import RATPlusCache, compute_dtype
from ratplus.model.rat import RATPlusLM

#: Tokens added per growth when a forward goes past the cache's size (see ``RATPlusHFCache.run``).
GROW_CHUNK = 256


class RATPlusHFCache(Cache):
    """Compact RAT+ cache for ``RATPlusForCausalLM`` (``cache``, ``past_key_values`` before transformers 5.24).

    ``max_len``: the tokens to allocate for (prompt + generated); None = the first forward's input.
    A later forward that goes past it grows the cache by at least ``GROW_CHUNK`` tokens, up to the
    model's ``max_seq_len``, keeping everything cached. The attention pattern is the one of the
    first forward (``pattern`` holds its canonical string from then on); another one is refused.
    """

    def __init__(self, max_len: int | None = None, decode_core: Callable | None = None):
        super().__init__(layers=[])
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        self.max_len = max_len
        # RATPlusLM.decode_step_hidden, or a torch.compile of it (RATPlusForCausalLM.compile_decode): one-token
        # steps then run the fixed-shape step (positions as a tensor: one compiled graph for every step)
        self.decode_core = decode_core
        self.pattern: str | None = None
        self.inner = None  # ratplus.model.cache.RATPlusCache once the first forward ran

    # ---- the forward path ---------------------------------------------------------------------
    def run(
        self,
        model: RATPlusLM,
        input_ids: torch.Tensor,
        pattern: str,
        attention_mask: torch.Tensor | None = None,
        all_hidden: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Feed input_ids (B, T) after the tokens already cached; returns their last block output
        (B, T, C) before the final norm (``RATPlusLM.hidden``; ``model.logits(h)`` gives the logits).

        ``attention_mask``: (B, T) or (B, cached + T), 0 = left padding (first call only).
        ``all_hidden``: a list that receives the embeddings and every block's output."""
        if self.pattern is not None and pattern != self.pattern:
            raise ValueError(
                f"this cache was built for attention pattern {self.pattern!r} but the forward asks for "
                f"{pattern!r}; start a new cache (or a new generate call) to switch patterns"
            )
        limit = model.config.max_seq_len
        if self.inner is None:
            # sized to the request: max_len when given (generate passes prompt + max_new_tokens), else
            # this input; the inner cache checks the limit itself
            max_len = self.max_len if self.max_len is not None else min(input_ids.shape[1], limit)
            weight = model.embedding.wte.weight
            # autocast's dtype when forward runs under it (Trainer / TRL leave it wrapped): the keys are bf16 then
            self.inner = RATPlusCache(
                model.config, pattern, input_ids.shape[0], max_len, device=weight.device, dtype=compute_dtype(weight)
            )
            self.pattern = pattern
        needed = max(self.inner.lengths) + input_ids.shape[1]
        if self.inner.max_len < needed <= limit:
            # generation continues past the size asked for: grow in chunks (one copy per chunk)
            self.inner.grow(min(limit, max(needed, self.inner.max_len + GROW_CHUNK)))
        if (
            self.decode_core is not None
            and input_ids.shape[1] == 1
            and all_hidden is None
            and self.inner.supports_fixed_step
            and not torch.compiler.is_compiling()
        ):
            return self._fixed_step(input_ids, attention_mask)
        # pattern=None: the inner cache runs the pattern it was built for (checked above), without
        # parsing the string again on every decode step.
        return model.hidden(input_ids, cache=self.inner, attention_mask=attention_mask, all_hidden=all_hidden)

    def _fixed_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """One token per row through ``decode_core`` (the fixed-shape step; host bookkeeping here, in
        eager code, so a compiled core sees the same shapes at every step). Returns (B, 1, C)."""
        inner = self.inner
        if not any(inner.lengths):
            raise ValueError("the fixed-shape step continues a prefilled cache; the first call must be the prompt")
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("padding is only allowed on the left of the first call (the prefill)")
        held = torch.tensor(inner.lengths, dtype=torch.long, device=input_ids.device)  # (B,)
        with torch.no_grad():  # the cache is inference-only (its buffers are written in place)
            inner.begin_fixed_step(held)
            try:
                h = self.decode_core(input_ids, inner, held)
            except BaseException:
                inner.end_fixed_step(ok=False)
                raise
            inner.end_fixed_step()
        return h

    # ---- what GenerationMixin reads -----------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns fed so far, left padding included, as ``generate`` counts ``input_ids`` (not the
        slots held: a sparse pattern keeps far fewer)."""
        return 0 if self.inner is None else self.inner.seq_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """-1: the cache grows as needed (up to the model's ``max_seq_len``)."""
        return -1

    def __len__(self) -> int:
        return 0 if self.inner is None else len(self.inner.layers)

    @property
    def batch_size(self) -> int:
        return -1 if self.inner is None else self.inner.batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.inner is not None

    @property
    def is_croppable(self) -> bool:
        return False

    def nbytes(self) -> int:
        """Bytes held by the compact cache (0 before the first forward)."""
        return 0 if self.inner is None else int(self.inner.nbytes())

    def reset(self) -> None:
        if self.inner is not None:
            self.inner.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep rows ``beam_idx`` (B,) of the batch, in that order."""
        if self.inner is not None:
            self.inner.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.inner is not None:
            self.inner.select(torch.arange(self.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError(
                "a RAT+ cache cannot drop tokens: they are already folded into the recurrent state "
                "(assisted / speculative decoding is not supported)"
            )

    def activate_past_recording(self) -> None:
        raise NotImplementedError("a RAT+ cache cannot record past states for rollback")

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise NotImplementedError("RAT+ layers write their compact cache themselves; Cache.update is not used")

    def __repr__(self) -> str:
        return (
            f"RATPlusHFCache(pattern={self.pattern!r}, seq_len={self.get_seq_length()}, "
            f"max_len={self.max_len}, nbytes={self.nbytes()})"
        )

"""Training through the transformers API: padding anywhere (each row trains as if alone), packed
sequences, gradient checkpointing (transformers' own on RATPlusBlock, same gradients), hidden states and
inputs_embeds, resize, from_pretrained from a state dict, the
max_seq_len rule shared with ratplus.generate, and the refusals (cache with labels, top-k training)."""

import pytest
import torch

pytest.importorskip("transformers")

from ratplus import ModelConfig, RATPlusLM, generate
from ratplus.hf import RATPlusConfig, RATPlusForCausalLM, RATPlusModel, from_native, to_native

TRAIN_PATTERNS = ["dense", "D4-W8-P2"]


def tiny(seed: int = 0, **overrides) -> RATPlusForCausalLM:
    torch.manual_seed(seed)
    values = dict(vocab_size=97, d_model=32, num_layers=2, num_heads=4, max_seq_len=64)
    values.update(overrides)
    return RATPlusForCausalLM(RATPlusConfig(**values)).train()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_sum_alone(model, rows: list[torch.Tensor]) -> torch.Tensor:
    """Sum over rows of each row's summed next-token loss, every row run alone (no padding)."""
    total = 0
    for row in rows:
        total = total + model(input_ids=row[None], labels=row[None]).loss * (row.numel() - 1)
    return total


@pytest.mark.parametrize("pattern", TRAIN_PATTERNS)
@pytest.mark.parametrize("side", ["right", "left", "middle"])
def test_padded_batch_trains_each_row_as_alone(pattern, side):
    """A padded batch (labels -100 on the pads, as the collators make them) under transformers'
    ForCausalLMLoss: every target != -100 counts, as for a Llama; the rows' own targets give the loss
    and gradients of each row run alone, and each target right after a masked position (the first token
    after left padding or a hole) costs exactly log V with no gradient (a masked position's logits are 0)."""
    model = tiny(1, attention_pattern=pattern)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 97, (n,), generator=gen) for n in (29, 17, 23)]
    T = 32
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for r, row in enumerate(rows):
        n = row.numel()
        if side == "right":
            cols = torch.arange(n)
        elif side == "left":
            cols = torch.arange(T - n, T)
        else:  # tokens spread over the row with pads between them
            cols = torch.randperm(T, generator=gen)[:n].sort().values
        ids[r, cols] = row
        mask[r, cols] = 1
    ids[mask == 0] = 5  # pad ids are arbitrary: they must not matter
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        for r, row in enumerate(rows):
            ref = model(input_ids=row[None]).logits[0]
            torch.testing.assert_close(out.logits[r][mask[r].bool()], ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.logits[mask == 0], torch.zeros_like(out.logits[mask == 0]))
    if side == "middle":
        return  # a target across a hole is predicted from the masked position before it (log V), not as alone
    counted = int((labels[:, 1:] != -100).sum())  # what Trainer passes as num_items_in_batch
    after_pad = int(((labels[:, 1:] != -100) & (mask[:, :-1] == 0)).sum())
    assert after_pad == {"right": 0, "left": 3}[side]
    total = out.loss * counted
    total.backward()
    padded = _grads(model)
    model.zero_grad()
    alone_sum = _loss_sum_alone(model, rows)
    torch.testing.assert_close(
        total.detach(), alone_sum.detach() + after_pad * torch.log(torch.tensor(97.0)), rtol=1e-5, atol=1e-4
    )
    alone_sum.backward()
    alone = _grads(model)
    assert padded.keys() == alone.keys() and len(alone) > 0
    for name in alone:
        torch.testing.assert_close(padded[name], alone[name], rtol=1e-4, atol=1e-6, msg=name)
    # num_items_in_batch divides the same sum (Trainer's count)
    again = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(counted + 7))
    torch.testing.assert_close(again.loss * (counted + 7), total.detach(), rtol=1e-5, atol=1e-4)


def test_packed_sequences_run_as_if_alone():
    """TRL's padding-free packing: one row, position_ids restarting at 0 per sequence, no mask."""
    model = tiny(3, attention_pattern="D4-W8-P2")
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 97, (n,), generator=gen) for n in (11, 20, 6)]
    packed = torch.cat(rows)[None]
    position_ids = torch.cat([torch.arange(r.numel()) for r in rows])[None]
    labels = packed.clone()
    labels[position_ids == 0] = -100  # as TRL's collator: no target across a sequence boundary
    out = model(input_ids=packed, position_ids=position_ids, labels=labels, output_hidden_states=True)
    (out.loss * (packed.shape[1] - len(rows))).backward()
    got = _grads(model)
    model.zero_grad()
    _loss_sum_alone(model, rows).backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        expected = torch.cat([model(input_ids=r[None]).logits[0] for r in rows])
        torch.testing.assert_close(out.logits[0], expected, rtol=1e-5, atol=1e-5)
        # positions that just count up are one sequence: the plain forward
        plain = model(input_ids=packed, position_ids=torch.arange(packed.shape[1])[None]).logits
        torch.testing.assert_close(plain, model(input_ids=packed).logits, rtol=0, atol=0)
    assert len(out.hidden_states) == model.config.num_layers + 1


def test_packed_rows_with_padding_run_as_if_alone():
    """Two packed rows, one right-padded, one left-padded: every sequence's logits are its own run
    alone, masked positions give zero logits; under torch.compile the regrouping breaks the graph at
    its two host reads only (whether a row packs several sequences; the regrouped batch's size), no
    dynamic-shape op (nonzero) any more."""
    model = tiny(5, attention_pattern="D4-W8-P2").eval()
    gen = torch.Generator().manual_seed(7)
    seqs = [[torch.randint(0, 97, (n,), generator=gen) for n in lens] for lens in ((7, 12), (5, 3, 9))]
    T = 22
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    pos = torch.zeros(2, T, dtype=torch.long)
    for r, row in enumerate(seqs):
        tokens = torch.cat(row)
        cols = torch.arange(tokens.numel()) if r == 0 else torch.arange(T - tokens.numel(), T)
        ids[r, cols], mask[r, cols] = tokens, 1
        pos[r, cols] = torch.cat([torch.arange(s.numel()) for s in row])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for r, row in enumerate(seqs):
            expected = torch.cat([model(input_ids=s[None]).logits[0] for s in row])
            torch.testing.assert_close(out[r][mask[r].bool()], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[mask == 0], torch.zeros_like(out[mask == 0]))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, position_ids=pos)
    torch._dynamo.reset()
    lines = {(f.filename, f.lineno) for r in explained.break_reasons for f in r.user_stack[-1:]}
    assert len(lines) == 2 and all(name.endswith("hf/modeling.py") for name, _ in lines), lines
    assert not any("Dynamic shape operator" in r.reason for r in explained.break_reasons)


@pytest.mark.parametrize(("every", "reentrant"), [(1, False), (2, False), (1, True)])
def test_gradient_checkpointing_is_transformers_own(every, reentrant):
    """The blocks are GradientCheckpointingLayer s (RATPlusBlock): transformers' switch recomputes every
    n-th block in backward, gradients equal the run without; the native switch stays off."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from ratplus.hf.modeling import RATPlusBlock

    model = tiny(5)
    blocks = model.model.backbone.layers
    assert all(type(b) is RATPlusBlock and isinstance(b, GradientCheckpointingLayer) for b in blocks)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(6))
    model(input_ids=ids, labels=ids).loss.backward()
    plain = _grads(model)
    model.zero_grad()
    if every == 1 and not reentrant:
        with pytest.warns(FutureWarning):  # transformers 5.x renamed it; both names reach the same switch
            model.gradient_checkpointing_enable()
    else:
        model.activation_checkpointing_enable(
            every_n_layers=every, activation_checkpointing_kwargs={"use_reentrant": reentrant}
        )
    assert model.is_activation_checkpointing and model.native.checkpoint_every == 0
    assert [b.gradient_checkpointing for b in blocks] == [i % every == 0 for i in range(len(blocks))]
    ffn = blocks[0].hidden_layer
    ran, forward = [], ffn.forward
    ffn.forward = lambda x: ran.append(1) or forward(x)
    model(input_ids=ids, labels=ids).loss.backward()
    del ffn.forward
    assert len(ran) == 2  # block 0 ran again in backward: it was recomputed
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing and not any(b.gradient_checkpointing for b in blocks)


def test_hidden_states_inputs_embeds_and_backbone():
    model = tiny(7).eval()
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        base = model.model(input_ids=ids)
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds)
        cached = model(input_ids=ids, use_cache=True, output_hidden_states=True)
    assert isinstance(model.base_model, RATPlusModel)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 19, 32)
    torch.testing.assert_close(out.hidden_states[0], embeds, rtol=0, atol=0)
    torch.testing.assert_close(out.hidden_states[-1], base.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, to_native(model)(ids), rtol=0, atol=0)
    torch.testing.assert_close(from_embeds.logits, out.logits, rtol=0, atol=0)
    for a, b in zip(cached.hidden_states, out.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cache_refuses_labels_with_gradients_and_runs_without_grad():
    model = tiny(9)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(10))
    with pytest.raises(ValueError, match="inference-only"):
        model(input_ids=ids, labels=ids, use_cache=True)
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids, use_cache=True).loss.isfinite()


def test_training_refuses_inference_only_patterns():
    model = tiny(11, attention_pattern="topk-B8-K2-W8-P2-quest")
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(12))
    with pytest.raises(ValueError, match=r"attention_pattern .* is inference-only"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():
        model(input_ids=ids)  # scoring in it is fine
    model.eval()(input_ids=ids)


def test_resize_token_embeddings_keeps_both_configs():
    model = tiny(13)
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120 == model.native.config.vocab_size
    ids = torch.tensor([[1, 119, 100, 5]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, 4, 120)
    out.loss.backward()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # still tied
    with pytest.raises(ValueError, match="vocab_size=120"):
        model(input_ids=ids + 100)


def test_from_pretrained_with_config_and_state_dict():
    model = tiny(14).eval()
    back = RATPlusForCausalLM.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_from_native_shares_the_weights():
    torch.manual_seed(16)
    native = RATPlusLM(ModelConfig.from_preset("tiny", eos_token_id=None))
    hf = from_native(native)
    assert to_native(hf) is native
    assert hf.get_input_embeddings() is native.embedding.wte
    assert sorted(hf.state_dict()) == sorted(f"model.{k}" for k in native.state_dict())


def test_generate_stops_at_max_seq_len_like_ratplus_generate():
    """One rule for both: prompt + new tokens never pass max_seq_len; generation stops there."""
    model = tiny(17).eval()
    ids = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(18))
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    native = generate(model.native, ids, 40)
    assert out.shape == native.shape == (2, 64)
    assert torch.equal(out, native)
    with pytest.raises(ValueError, match="no room to generate"):
        model.generate(torch.ones(1, 64, dtype=torch.long), max_new_tokens=2, pad_token_id=0)

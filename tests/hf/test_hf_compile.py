"""torch.compile(fullgraph=True) of the HF model: the training forward (mask and loss, backward too)
for dense, dilated and head-group patterns with the recurrence, and a decode step with the compact
cache, each as one graph (fullgraph raises on any graph break) and equal to eager. Dynamo's "eager"
backend is used: it traces exactly as inductor would, without the C++ compile time. The traced
paths of the kernels (the chunked scan's and the sparse merge's functional writes) are checked
against their references here too."""

import pytest
import torch

pytest.importorskip("transformers")

from ratplus.hf import RATPlusConfig, RATPlusForCausalLM, RATPlusHFCache
from ratplus.ops.attention import attention
from ratplus.ops.scan import gated_scan

# each trace takes 5-10 s on a shared 2-core CPU: one dense and one sparse case by default, the rest slow
PATTERNS = [
    "dense",
    "D4-W8-P2",
    pytest.param("local-W8-P2", marks=pytest.mark.slow),
    pytest.param("D4:2+local-W8-P1:2", marks=pytest.mark.slow),
]
DECODE_PATTERNS = [
    pytest.param("dense", marks=pytest.mark.slow),
    "D4-W8-P2",
    pytest.param("D4:2+local-W8-P1:2", marks=pytest.mark.slow),
]


def tiny(pattern: str, seed: int = 0) -> RATPlusForCausalLM:
    torch.manual_seed(seed)
    config = RATPlusConfig(
        vocab_size=97, d_model=32, num_layers=2, num_heads=4, max_seq_len=96, attention_pattern=pattern
    )
    return RATPlusForCausalLM(config)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_training_forward_is_one_graph(pattern):
    model = tiny(pattern).train()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    labels = ids.masked_fill(mask == 0, -100)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    loss = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    got = _grads(model)
    model.zero_grad()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    torch.testing.assert_close(loss, ref)
    want = _grads(model)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("pattern", DECODE_PATTERNS)
def test_decode_step_with_cache_is_one_graph(pattern):
    """After an eager prefill, each decode step (one token, the mask generate passes, logits_to_keep=1)
    traces as one graph, and gives the eager step's logits."""
    model = tiny(pattern).eval()
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    caches = [RATPlusHFCache(max_len=32), RATPlusHFCache(max_len=32)]
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        for cache in caches:
            model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        token = torch.randint(0, 97, (2, 1), generator=torch.Generator().manual_seed(3))
        for _ in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            kwargs = dict(input_ids=token, attention_mask=mask, use_cache=True, logits_to_keep=1)
            got = compiled(cache=caches[0], **kwargs).logits
            want = model(cache=caches[1], **kwargs).logits
            torch.testing.assert_close(got, want)
            token = want[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("with_h0", [False, True])
def test_traced_chunked_scan_matches_reference(with_h0):
    """The chunked scan's functional pass (taken while tracing): outputs and gradients equal the loop reference."""
    gen = torch.Generator().manual_seed(4)
    g = torch.rand(2, 3, 29, 8, generator=gen).requires_grad_()
    x = torch.randn(2, 3, 29, 8, generator=gen).requires_grad_()
    h0 = torch.randn(2, 3, 8, generator=gen).requires_grad_() if with_h0 else None
    fn = torch.compile(lambda g, x, h0: gated_scan(g, x, h0, backend="chunked"), backend="eager", fullgraph=True)
    out = fn(g, x, h0)
    grads = torch.autograd.grad(out.square().sum(), [t for t in (g, x, h0) if t is not None])
    ref = gated_scan(g, x, h0, backend="reference")
    ref_grads = torch.autograd.grad(ref.square().sum(), [t for t in (g, x, h0) if t is not None])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pattern", ["D4-W8-P2", "D16-W3-P1", "local-W8-P2"])
def test_traced_sparse_attention_matches_reference(pattern):
    """The sparse CPU kernel's functional row writes (taken while tracing) equal the exact-mask reference."""
    from ratplus.config import AttentionPattern

    p = AttentionPattern.parse(pattern)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=gen) for _ in range(3))
    fn = torch.compile(lambda q, k, v: attention(q, k, v, p, backend="sparse"), backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), attention(q, k, v, p, backend="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["dense", "D4-W8-P2", "topk-B8-K2-W8-P2-quest"])
def test_compile_decode_one_graph_for_every_step(pattern):
    """compile_decode(): generate()'s one-token steps run the fixed-shape step, traced once for the whole
    generation (left padding included) and giving eager's tokens; top-k keeps the eager step."""
    from torch._dynamo.testing import CompileCounter

    model = tiny(pattern).eval()
    ids = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kwargs)
    counter = CompileCounter()
    got = model.compile_decode(backend=counter).generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert counter.frame_count == (0 if pattern.startswith("topk") else 1)
    assert torch.equal(model.compile_decode(False).generate(ids, **kwargs), want)

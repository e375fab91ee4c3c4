"""FlexAttention path. On CPU it runs only compiled and forward-only (marked slow: compile time)."""

import pytest
import torch

from ratplus import AttentionPattern
from ratplus.ops.attention import attention_reference
from ratplus.ops.attention.flex import flex_attention_pattern, get_block_mask


@pytest.mark.slow
@pytest.mark.parametrize(
    "pattern", [AttentionPattern(4, 0, 0), AttentionPattern(8, 16, 3), AttentionPattern(None, 20, 2)]
)
def test_flex_cpu_forward_matches_reference(pattern):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=gen) for _ in range(3))
    with torch.no_grad():
        out = flex_attention_pattern(q, k, v, pattern)
    torch.testing.assert_close(out, attention_reference(q, k, v, pattern), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_block_mask_is_cached():
    p = AttentionPattern(4, 0, 0)
    assert get_block_mask(p, 256, 256, 0, torch.device("cpu")) is get_block_mask(p, 256, 256, 0, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "pattern", [AttentionPattern(4, 0, 0), AttentionPattern(16, 64, 4), AttentionPattern(None, 64, 4)]
)
def test_flex_cuda_matches_reference_with_grads(pattern):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 512, 64, generator=gen, device="cuda", requires_grad=True) for _ in range(3))
    out = flex_attention_pattern(q, k, v, pattern)
    ref = attention_reference(q, k, v, pattern)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    up = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up), strict=True):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3)

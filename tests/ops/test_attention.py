import itertools

import pytest
import torch
import torch.nn.functional as F

from ratplus import AttentionPattern, HeadGroups
from ratplus.ops.attention import (
    attention,
    attention_reference,
    dilated_attention_cpu,
    dilated_mask,
    sparse_attention_blocked,
)


def _qkv(B, H, T, K, dtype=torch.float64, seed=0, S=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, generator=gen, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, H, S or T, K, generator=gen, dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v


def _brute_keyset(t, D, W, P):
    """docs/DESIGN.md section 3, written as the literal set definitions."""
    local = {p for p in range(t + 1) if t - W <= p <= t}
    initial = {p for p in range(t + 1) if p < P}
    dilated = set() if D is None else {p for p in range(t + 1) if (p + 1) % D == 0 and p >= P and p < t - W}
    return local | initial | dilated


@pytest.mark.parametrize("D, W, P", [(1, 0, 0), (4, 0, 0), (3, 2, 5), (None, 3, 2), (7, 0, 9), (2, 50, 0)])
def test_mask_is_the_design_index_set(D, W, P):
    T = 40
    mask = dilated_mask(AttentionPattern(D, W, P), T, T)
    for t in range(T):
        assert set(torch.nonzero(mask[t]).flatten().tolist()) == _brute_keyset(t, D, W, P)


GRID = list(
    itertools.product(
        [1, 7, 64, 100, 131],  # T, including non-aligned lengths
        [1, 2, 5, 16, None],  # D
        [0, 1, 9, 200],  # W (200 >= T: the window covers everything)
        [0, 3, 20],  # P (P > D included)
    )
)


@pytest.mark.parametrize("T, D, W, P", GRID)
def test_fast_path_matches_reference_outputs_and_grads(T, D, W, P):
    pattern = AttentionPattern(D, W, P)
    q, k, v = _qkv(2, 3, T, 8, seed=T * 31 + W)
    ref = attention_reference(q, k, v, pattern)
    # small blocks/groups so that every code path (prefix, diagonal, band, initial) runs at these T
    out = dilated_attention_cpu(q, k, v, pattern, block_size=16, group_size=32)
    auto = attention(q, k, v, pattern)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(auto, ref, rtol=1e-10, atol=1e-10)
    up = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (q, k, v), up)
    g_out = torch.autograd.grad(out, (q, k, v), up)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _assert_parity_with_grads(out, ref, inputs, seed=1):
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=ref.dtype)
    g_ref = torch.autograd.grad(ref, inputs, up)
    g_out = torch.autograd.grad(out, inputs, up)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# group sizes that make the dilated part take each route at D = 3: one chunk per group (far keys
# only), a few near keys per row (matmuls), many near keys per row (a second, masked flash call)
NEAR_ROUTES = {"far only": 5, "near by matmul": 30, "near by flash": 60}


@pytest.mark.parametrize("route", list(NEAR_ROUTES))
@pytest.mark.parametrize("W, P", [(0, 0), (4, 0), (0, 7), (5, 2)])
def test_fast_path_near_key_routes(route, W, P):
    from ratplus.ops.attention.sparse import _Plan

    T, D, group = 157, 3, NEAR_ROUTES[route]
    pattern = AttentionPattern(D, W, P)
    plan = _Plan(T, pattern, 16, group, torch.float64, torch.device("cpu"))
    near = [g for g in plan.groups if g.near_mask is not None]
    assert len(plan.groups) > 2  # several groups, the last one ending in a partial chunk or not
    if route == "far only":
        assert not near
    else:
        assert near and all(g.near_flash == (route == "near by flash") for g in near)
    q, k, v = _qkv(1, 2, T, 8, seed=W * 7 + P)
    out = dilated_attention_cpu(q, k, v, pattern, block_size=16, group_size=group)
    _assert_parity_with_grads(out, attention_reference(q, k, v, pattern), (q, k, v))


def test_per_head_groups_grads_default_sizes():
    # one head per pattern kind, long enough that the default group sizes make several groups
    groups = "D4:1+D16-W9-P3:1+local-W7-P2:1+D3:1"
    q, k, v = _qkv(2, 4, 301, 8, seed=5)
    out = attention(q, k, v, groups)
    parts = [
        attention_reference(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], AttentionPattern.parse(name))
        for h, name in enumerate(("D4", "D16-W9-P3", "local-W7-P2", "D3"))
    ]
    _assert_parity_with_grads(out, torch.cat(parts, dim=1), (q, k, v))


@pytest.mark.parametrize("D, W, P", [(4, 0, 0), (3, 5, 2), (None, 6, 1), (1, 0, 0)])
@pytest.mark.parametrize("q_offset", [0, 13])
def test_blocked_path_with_offset_matches_reference(D, W, P, q_offset):
    pattern = AttentionPattern(D, W, P)
    T = 37
    q, k, v = _qkv(1, 2, T, 8, S=T + q_offset, seed=q_offset)
    ref = attention_reference(q, k, v, pattern, q_offset=q_offset)
    out = sparse_attention_blocked(q, k, v, pattern, q_offset=q_offset, block_size=8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    auto = attention(q, k, v, pattern, q_offset=q_offset)
    torch.testing.assert_close(auto, ref, rtol=1e-10, atol=1e-10)


def test_dense_pattern_equals_causal_sdpa():
    q, k, v = _qkv(2, 4, 50, 16, dtype=torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for backend in ("auto", "reference", "sparse", "sdpa"):
        out = attention(q, k, v, AttentionPattern(dilation_size=1, local_size=0, initial_size=0), backend=backend)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_float32_fast_path():
    q, k, v = _qkv(1, 2, 300, 32, dtype=torch.float32)
    for pattern in (AttentionPattern(16), AttentionPattern(8, 20, 4), AttentionPattern(None, 30, 2)):
        torch.testing.assert_close(
            attention(q, k, v, pattern), attention_reference(q, k, v, pattern), rtol=1e-5, atol=1e-5
        )


def test_per_head_groups():
    q, k, v = _qkv(1, 4, 45, 8)
    groups = HeadGroups(((AttentionPattern(4), 1), (AttentionPattern(None, 5, 2), 2), (AttentionPattern(), 1)))
    out = attention(q, k, v, groups)
    parts = [
        attention_reference(q[:, :1], k[:, :1], v[:, :1], AttentionPattern(4)),
        attention_reference(q[:, 1:3], k[:, 1:3], v[:, 1:3], AttentionPattern(None, 5, 2)),
        attention_reference(q[:, 3:], k[:, 3:], v[:, 3:], AttentionPattern()),
    ]
    torch.testing.assert_close(out, torch.cat(parts, dim=1), rtol=1e-10, atol=1e-10)
    assert torch.equal(attention(q, k, v, "D4:1+local-W5-P2:2+dense:1"), out)


def test_sparse_really_differs_from_dense():
    # guards against a backend silently falling back to dense attention
    q, k, v = _qkv(1, 2, 80, 8)
    dense = attention(q, k, v, None)
    assert (attention(q, k, v, AttentionPattern(16)) - dense).abs().max() > 1e-3


def test_attention_bad_input():
    q, k, v = _qkv(1, 2, 10, 8)
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, "D4", backend="magic")
    with pytest.raises(ValueError, match="covers 3 heads"):
        attention(q, k, v, "D4:1+dense:2")
    with pytest.raises(ValueError, match="expects"):
        attention(q, k[:, :1], v, "D4")
    with pytest.raises(ValueError, match="unknown attention pattern"):
        attention(q, k, v, "D4x")


def test_reference_backend_covers_topk():
    from ratplus.ops.attention.topk import topk_attention_reference

    q, k, v = _qkv(1, 2, 90, 8)
    pattern = AttentionPattern.parse("topk-B8-K2-W4-P2-quest")
    ref = attention(q, k, v, pattern, backend="reference")
    torch.testing.assert_close(ref, topk_attention_reference(q, k, v, pattern))
    torch.testing.assert_close(attention(q, k, v, pattern), ref, rtol=1e-9, atol=1e-9)

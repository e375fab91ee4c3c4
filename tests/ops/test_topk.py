import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ratplus import AttentionPattern
from ratplus.ops.attention import attention
from ratplus.ops.attention.topk import (
    block_scores,
    block_summaries,
    topk_attention,
    topk_attention_reference,
    topk_decode_attention,
    topk_mask_reference,
)


def topk(B, K, W, P, scoring="quest"):
    return AttentionPattern(kind="topk", block_size=B, top_k=K, local_size=W, initial_size=P, scoring=scoring)


def _qkv(B, H, T, K, S=None, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, generator=gen, dtype=dtype)
    k, v = (torch.randn(B, H, S or T, K, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v


def _brute_keyset(q_t, k, t, pattern):
    """One query, one head, plain Python floats: the definition in ratplus/ops/attention/topk.py."""
    P, W, Bs = pattern.initial_size, pattern.local_size, pattern.block_size
    keys = {p for p in range(t + 1) if p >= t - W or p < P}
    scored = []
    b = 0
    while P + (b + 1) * Bs <= t - W:  # complete blocks older than the window
        block = [k[p] for p in range(P + b * Bs, P + (b + 1) * Bs)]
        if pattern.scoring == "quest":
            score = sum(
                max(q_t[i] * max(x[i] for x in block), q_t[i] * min(x[i] for x in block)) for i in range(len(q_t))
            )
        else:
            score = sum(q_t[i] * sum(x[i] for x in block) / Bs for i in range(len(q_t)))
        scored.append((score, b))
        b += 1
    for _, b in sorted(scored, reverse=True)[: pattern.top_k]:
        keys |= set(range(P + b * Bs, P + (b + 1) * Bs))
    return keys


@pytest.mark.parametrize("pattern", [topk(4, 2, 3, 2), topk(3, 3, 0, 0, "moba"), topk(5, 1, 6, 7), topk(2, 0, 1, 1)])
def test_reference_is_the_definition(pattern):
    q, k, _ = _qkv(1, 1, 40, 4, seed=3)
    mask = topk_mask_reference(q, k, pattern)
    for t in range(40):
        expected = _brute_keyset(q[0, 0, t].tolist(), k[0, 0].tolist(), t, pattern)
        assert set(torch.nonzero(mask[0, 0, t]).flatten().tolist()) == expected, t


@pytest.mark.parametrize("pattern", [topk(4, 2, 3, 2), topk(8, 3, 8, 4, "moba"), topk(5, 1, 0, 0)])
def test_key_count_is_keys_per_query(pattern):
    # the FLOP accounting of AttentionPattern.keys_per_query matches the implemented key sets
    q, k, _ = _qkv(1, 2, 90, 4, seed=1)
    counts = topk_mask_reference(q, k, pattern).sum(-1)  # (1, 2, 90)
    for t in range(90):
        assert counts[0, :, t].tolist() == [pattern.keys_per_query(t)] * 2, t


GRID = list(
    itertools.product(
        [(4, 2, 3, 2), (7, 3, 0, 5), (3, 100, 2, 0), (16, 1, 20, 1)],  # block, k, W, P
        ["quest", "moba"],
        [(33, 0), (1, 70), (9, 50)],  # (T, q_offset): full sequence, one decode query, a chunk
    )
)


@pytest.mark.parametrize("sizes, scoring, shape", GRID)
def test_prefill_and_decode_match_reference(sizes, scoring, shape):
    pattern = topk(*sizes, scoring)
    T, q_offset = shape
    S = T + q_offset
    q, k, v = _qkv(2, 3, T, 8, S=S, seed=T + q_offset)
    ref = topk_attention_reference(q, k, v, pattern, q_offset)
    fast = topk_attention(q, k, v, pattern, q_offset, chunk_size=4)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attention(q, k, v, pattern, q_offset=q_offset), ref, rtol=1e-10, atol=1e-10)
    P, Bs = pattern.initial_size, pattern.block_size
    N = max(0, S - P) // Bs
    summaries = block_summaries(k[:, :, P : P + N * Bs], pattern)
    for i in range(T):
        t = q_offset + i
        out = topk_decode_attention(q[:, :, i : i + 1], k, v, summaries, t, pattern)
        torch.testing.assert_close(out, ref[:, :, i : i + 1], rtol=1e-10, atol=1e-10)


def test_every_block_chosen_is_dense_attention():
    # blocks of one key, k large: the blocks tile everything older than the window, so every key is seen
    q, k, v = _qkv(1, 2, 30, 8)
    out = topk_attention(q, k, v, topk(1, 1000, 2, 1))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-10, atol=1e-10)


def test_topk_really_selects():
    # guards against the selection silently keeping every block (or none)
    q, k, v = _qkv(1, 2, 80, 8)
    out = topk_attention(q, k, v, topk(4, 2, 4, 1))
    assert (out - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max() > 1e-3
    assert (out - attention(q, k, v, AttentionPattern(None, 4, 1))).abs().max() > 1e-3


@pytest.mark.parametrize("scoring", ["quest", "moba"])
def test_block_scores(scoring):
    pattern = topk(6, 1, 0, 0, scoring)
    q, k, _ = _qkv(2, 2, 5, 8, S=24)
    scores = block_scores(q, block_summaries(k, pattern), pattern)  # (2, 2, 5, 4)
    blocks = k.unflatten(2, (4, 6))  # (2, 2, 4, 6, 8)
    dots = torch.einsum("bhtk,bhnsk->bhtns", q, blocks)  # (2, 2, 5, 4, 6)
    if scoring == "quest":
        quest = torch.maximum(
            q[:, :, :, None] * blocks.amax(3)[:, :, None], q[:, :, :, None] * blocks.amin(3)[:, :, None]
        )
        torch.testing.assert_close(scores, quest.sum(-1))
        assert (scores >= dots.amax(-1) - 1e-12).all()  # an upper bound of q . k over the block
    else:
        torch.testing.assert_close(scores, dots.mean(-1))


def test_float32_and_long_chunks():
    q, k, v = _qkv(1, 2, 200, 16, dtype=torch.float32)
    pattern = topk(16, 3, 16, 2)
    ref = topk_attention_reference(q.double(), k.double(), v.double(), pattern).float()
    torch.testing.assert_close(topk_attention(q, k, v, pattern), ref, rtol=1e-5, atol=1e-5)


def test_bad_input():
    q, k, v = _qkv(1, 2, 10, 8)
    with pytest.raises(ValueError, match="top-k pattern"):
        topk_attention(q, k, v, AttentionPattern(4))
    with pytest.raises(ValueError, match="need keys"):
        topk_attention(q, k, v, topk(4, 1, 0, 0), q_offset=3)
    with pytest.raises(ValueError, match="whole blocks"):
        block_summaries(k[:, :, :7], topk(4, 1, 0, 0))
    assert math.isfinite(topk_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], topk(4, 1, 0, 3)).sum().item())

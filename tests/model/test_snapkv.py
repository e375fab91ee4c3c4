"""SnapKV eviction: the selection (brute force), decode == a full forward over the kept keys, exact bytes."""

import pytest
import torch

from ratplus import ModelConfig, RATPlusLM
from ratplus.config import SNAPKV_KERNEL, AttentionPattern
from ratplus.model.cache import RATPlusCache
from ratplus.ops.attention import repeat_kv
from ratplus.ops.attention.reference import masked_attention_reference
from ratplus.ops.attention.snapkv import snapkv_select
from ratplus.ops.rope import apply_rope


def _model(num_kv_heads=None, apply_re=True) -> RATPlusLM:
    torch.manual_seed(0)
    return RATPlusLM(ModelConfig.from_preset("tiny", num_kv_heads=num_kv_heads, apply_re=apply_re)).double().eval()


def test_pattern_string_slots_and_bad_input():
    p = AttentionPattern.parse("snapkv-C1024-O64")
    assert p.is_snapkv and str(p) == "snapkv-C1024-O64" and (p.cache_size, p.window) == (1024, 64)
    assert p.kv_slots(4096) == 1024 + 64 + 1 and p.kv_slots(100) == 101
    with pytest.raises(ValueError, match=r"cache_size=8 .* below its observation window"):
        AttentionPattern.parse("snapkv-C8-O16")
    with pytest.raises(ValueError, match="unknown field 'W4'"):
        AttentionPattern.parse("snapkv-C16-O8-W4")


def test_selection_is_the_brute_force_vote():
    torch.manual_seed(1)
    B, H, Hkv, T, K, O, C = 2, 4, 2, 30, 8, 5, 6
    q, k = torch.randn(B, H, T, K, dtype=torch.float64), torch.randn(B, Hkv, T, K, dtype=torch.float64)
    got = snapkv_select(q[:, :, -O:], k, C, SNAPKV_KERNEL)
    for b in range(B):
        for j in range(Hkv):
            votes = [0.0] * (T - O)
            for h in range(j * 2, j * 2 + 2):  # the query heads of KV head j
                for t in range(T - O, T):
                    w = torch.softmax(q[b, h, t] @ k[b, j, : t + 1].T / K**0.5, dim=0)
                    for p in range(T - O):
                        votes[p] += float(w[p])
            r = SNAPKV_KERNEL // 2
            pooled = [max(votes[max(0, p - r) : p + r + 1]) for p in range(T - O)]
            best = sorted(sorted(range(T - O), key=lambda p: -pooled[p])[:C])
            assert got[b, j].tolist() == best + list(range(T - O, T))
    assert snapkv_select(q[:, :, -O:], k[:, :, :11], C, SNAPKV_KERNEL).shape[-1] == 11  # short prompt: all kept


def _reference_forward(model, ids, prompt_len, kept):
    """Full forward where query t >= prompt_len sees the kept prompt keys of its KV head plus
    positions prompt_len..t, earlier queries dense causal; kept[layer]: (B, Hkv, n) positions."""
    B, T = ids.shape
    G = model.config.kv_group
    x = model.embedding.wte(ids)
    cos, sin = model.rope(torch.arange(T), x.dtype)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for block, keep in zip(model.backbone.layers, kept, strict=True):
        layer = block.seq_layer
        o, q, k, v, g = layer.project(x)
        if g is not None:
            k, v = layer.recur(g, k, v, scan_backend="reference")
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = causal.expand(B, k.shape[1], T, T).clone()  # (B, Hkv, T, S)
        prompt_keys = torch.zeros(B, k.shape[1], T, dtype=torch.bool)
        prompt_keys.scatter_(2, keep, True)
        prompt_keys[..., prompt_len:] = True
        mask[:, :, prompt_len:] &= prompt_keys.unsqueeze(2)
        a = masked_attention_reference(q, repeat_kv(k, G), repeat_kv(v, G), repeat_kv(mask, G))
        x = x + layer.out_proj(a.transpose(1, 2).reshape(x.shape) * torch.sigmoid(o))
        x = x + block.hidden_layer(x)
    return model.logits(x)


@pytest.mark.parametrize("apply_re", [True, False])
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_decode_equals_full_forward_over_kept_keys(apply_re, num_kv_heads):
    model = _model(num_kv_heads, apply_re)
    ids = torch.randint(0, 256, (2, 48))
    prompt_len, pattern = 30, "snapkv-C6-O4"
    cache = RATPlusCache(model.config, pattern, batch_size=2, max_len=48, dtype=torch.float64)
    with torch.no_grad():
        outs = [model(ids[:, :prompt_len], cache=cache)]
        outs += [model(ids[:, t : t + 1], cache=cache) for t in range(prompt_len, 40)]
        outs.append(model(ids[:, 40:], cache=cache))  # several tokens at once
        kept = [torch.stack(layer.groups[0].kept) for layer in cache.layers]
        assert all(kp.shape[-1] == 10 for kp in kept)
        expected = _reference_forward(model, ids, prompt_len, kept)
    torch.testing.assert_close(torch.cat(outs, dim=1), expected)
    # the prompt logits are dense, and some prompt keys really were dropped (the test can fail)
    torch.testing.assert_close(outs[0], model(ids[:, :prompt_len]))
    assert not torch.allclose(torch.cat(outs, dim=1)[:, prompt_len:], model(ids)[:, prompt_len:])


def test_left_padded_rows_keep_their_own_keys():
    model = _model(2)
    ids = torch.randint(0, 256, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :5] = 0  # row 1: a 25-token prompt
    cache = RATPlusCache(model.config, "snapkv-C6-O4", batch_size=2, max_len=40, dtype=torch.float64)
    solo = RATPlusCache(model.config, "snapkv-C6-O4", batch_size=1, max_len=35, dtype=torch.float64)
    with torch.no_grad():
        model(ids, cache=cache, attention_mask=mask)
        model(ids[1:, 5:], cache=solo)
        nxt = torch.randint(0, 256, (2, 1))
        both, alone = model(nxt, cache=cache), model(nxt[1:], cache=solo)
    torch.testing.assert_close(both[1:], alone)
    assert torch.equal(cache.layers[0].groups[0].kept[1], solo.layers[0].groups[0].kept[0])


@pytest.mark.parametrize("apply_re", [True, False])
def test_cache_bytes_are_exact(apply_re):
    model = _model(2, apply_re)
    B, prompt_len, max_len = 3, 40, 56
    cache = RATPlusCache(model.config, "snapkv-C8-O4", batch_size=B, max_len=max_len, dtype=torch.float64)
    with torch.no_grad():
        model(torch.randint(0, 256, (B, prompt_len)), cache=cache)
    L, Hkv, K = 2, 2, model.config.head_dim
    slots = 8 + 4 + (max_len - prompt_len)
    state = B * Hkv * 2 * K * 8 if apply_re else 0
    assert cache.nbytes() == L * (B * Hkv * slots * 2 * K * 8 + state)

"""Grouped-query / multi-query attention (``ModelConfig.num_kv_heads``): config checks, parity with
plain multi-head attention, GQA == attention over repeated KV heads, decode == full forward, bytes."""

import pytest
import torch

from ratplus import ModelConfig, RATPlusLM
from ratplus.model.cache import RATPlusCache
from ratplus.ops.attention import attention, repeat_kv
from ratplus.ops.rope import apply_rope

PATTERNS = ["dense", "D4-W3-P2", "local-W5-P1", "topk-B4-K2-W3-P1-quest", "topk-B4-K1-W2-moba", "D4:2+local-W3:2"]


def _model(num_kv_heads=None, apply_re=True, seed=0, dtype=torch.float64) -> RATPlusLM:
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("tiny", num_kv_heads=num_kv_heads, apply_re=apply_re)
    return RATPlusLM(config).to(dtype).eval()


@pytest.mark.parametrize("bad", [3, 0, -1, 8, 2.0, True])
def test_num_kv_heads_must_divide_num_heads(bad):
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.from_preset("tiny", num_kv_heads=bad)


def test_default_is_num_heads_and_round_trips():
    config = ModelConfig.from_preset("demo")
    assert config.num_kv_heads == config.num_heads and config.kv_group == 1
    gqa = ModelConfig.from_preset("demo", num_kv_heads=1)
    assert ModelConfig.from_dict(gqa.to_dict()) == gqa
    legacy = {k: v for k, v in config.to_dict().items() if k != "num_kv_heads"}  # config.json of older folders
    assert ModelConfig.from_dict(legacy).num_kv_heads == config.num_heads


@pytest.mark.parametrize("apply_re", [True, False])
def test_num_kv_heads_equal_num_heads_is_todays_model(apply_re):
    """Same state-dict shapes and the same numbers as a model built without the field."""
    torch.manual_seed(0)
    old = RATPlusLM(ModelConfig.from_preset("tiny", apply_re=apply_re))
    torch.manual_seed(0)
    new = RATPlusLM(ModelConfig.from_preset("tiny", apply_re=apply_re, num_kv_heads=4))
    C = old.config.d_model
    assert old.backbone.layers[0].seq_layer.in_proj.weight.shape == ((5 if apply_re else 4) * C, C)
    for (ka, a), (kb, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b), ka
    ids = torch.randint(0, 256, (2, 33))
    for pattern in ("dense", "D4-W3-P2"):
        assert torch.equal(old(ids, pattern=pattern), new(ids, pattern=pattern))


@pytest.mark.parametrize("apply_re", [True, False])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_params_and_shapes(apply_re, num_kv_heads):
    model = _model(num_kv_heads, apply_re)
    config = model.config
    C, kv = config.d_model, num_kv_heads * config.head_dim
    rows = 2 * C + (3 if apply_re else 2) * kv
    assert model.backbone.layers[0].seq_layer.in_proj.weight.shape == (rows, C)
    assert config.num_params() == model.num_params()
    ids = torch.randint(0, 256, (2, 21))
    assert model(ids, pattern="D4").shape == (2, 21, 256)


@pytest.mark.parametrize("apply_re", [True, False])
@pytest.mark.parametrize("pattern", ["dense", "D4-W3-P2", "D4:2+local-W3:2"])
def test_gqa_layer_is_attention_over_repeated_kv_heads(apply_re, pattern):
    """The layer's output rebuilt by hand through the ops: q on H heads, k, v (after the recurrence
    on the KV heads) repeated so query head h reads KV head h // G."""
    model = _model(2, apply_re)
    layer = model.backbone.layers[0].seq_layer
    x = torch.randn(2, 19, model.config.d_model, dtype=torch.float64)
    cos, sin = model.rope(torch.arange(19), x.dtype)
    groups = model.resolve_pattern(pattern)[0]
    o, q, k, v, g = layer.project(x)
    assert q.shape[1] == 4 and k.shape[1] == 2 and (g is None or g.shape[1] == 2)
    if g is not None:
        k, v = layer.recur(g, k, v, scan_backend="reference")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_rep = torch.stack([k[:, h // 2] for h in range(4)], dim=1)  # explicit: head h uses KV head h // G
    v_rep = torch.stack([v[:, h // 2] for h in range(4)], dim=1)
    assert torch.equal(k_rep, repeat_kv(k, 2))
    a = attention(q, k_rep, v_rep, groups, backend="reference").transpose(1, 2).reshape(x.shape)
    expected = layer.out_proj(a * torch.sigmoid(o))
    torch.testing.assert_close(layer(x, groups, cos, sin, backend="reference", scan_backend="reference"), expected)


@pytest.mark.parametrize("apply_re", [True, False])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_decode_equals_full_forward(apply_re, num_kv_heads, pattern):
    if num_kv_heads == 1 and ":" in pattern:
        pattern = "D4:4"  # MQA: one KV group holds every head
    model = _model(num_kv_heads, apply_re)
    ids = torch.randint(0, 256, (2, 41))
    full = model(ids, pattern=pattern)
    cache = RATPlusCache(model.config, pattern, batch_size=2, max_len=41, dtype=torch.float64)
    with torch.no_grad():
        outs = [model(ids[:, :17], cache=cache)]  # prefill
        outs += [model(ids[:, t : t + 1], cache=cache) for t in range(17, 30)]  # decode steps
        outs.append(model(ids[:, 30:], cache=cache))  # several tokens at once
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


@pytest.mark.parametrize("pattern", ["dense", "D4-W3-P2", "local-W5-P1", "topk-B4-K2-W3-P1-quest"])
def test_cache_bytes_shrink_by_the_group(pattern):
    mha, gqa = _model(None, dtype=torch.float32), _model(1, dtype=torch.float32)
    full = RATPlusCache(mha.config, pattern, batch_size=3, max_len=64).nbytes()
    grouped = RATPlusCache(gqa.config, pattern, batch_size=3, max_len=64).nbytes()
    assert full == 4 * grouped  # num_heads / num_kv_heads = 4, the state included


def test_head_groups_must_be_whole_kv_groups():
    config = ModelConfig.from_preset("tiny", num_kv_heads=2)
    with pytest.raises(ValueError, match=r"splits a KV group.*multiple of 2"):
        config.resolve_pattern("D4:1+local-W3:3")
    with pytest.raises(ValueError, match="splits a KV group"):
        RATPlusCache(config, "D4:3+dense:1", batch_size=1, max_len=16)
    assert config.canonical_pattern("D4:2+local-W3:2") == "D4-W0-P0:2+local-W3-P0:2"


def test_gqa_trains_jointly():
    """Both passes of a joint step (sparse, then dense) reach every parameter, k/v/f rows included."""
    model = _model(2, dtype=torch.float32)
    model.train()
    ids = torch.randint(0, 256, (2, 40))
    for pattern in ("D4", None):  # the joint step's two passes
        model(ids, pattern=pattern, labels=ids.roll(-1, 1)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("apply_re", [True, False])
def test_fixed_shape_decode_step_with_gqa(apply_re):
    """``RATPlusLM.decode_step`` (the fixed-shape path ``generate`` uses) == the full forward, rows at
    different lengths (left-padded prompts)."""
    model = _model(2, apply_re)
    ids = torch.randint(0, 256, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :4] = 0
    for pattern in ("dense", "D4-W3-P2", "D4:2+local-W3:2"):
        cache = RATPlusCache(model.config, pattern, batch_size=2, max_len=40, dtype=torch.float64)
        assert cache.supports_fixed_step
        with torch.no_grad():
            model(ids[:, :20], cache=cache, attention_mask=mask[:, :20])
            held = torch.tensor(cache.lengths)
            steps = []
            for t in range(20, 30):
                steps.append(model.decode_step(ids[:, t : t + 1], cache, held))
                held = held + 1
        got = torch.stack(steps, dim=1)
        torch.testing.assert_close(got[0], model(ids[:1], pattern=pattern)[0, 20:])
        torch.testing.assert_close(got[1], model(ids[1:, 4:], pattern=pattern)[0, 16:])

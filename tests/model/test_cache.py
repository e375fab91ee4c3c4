import gc
import weakref

import pytest
import torch

from ratplus import AttentionPattern, ModelConfig, RATPlusLM
from ratplus.model.cache import RATPlusCache, SlotLayout

# dense, several dilated (with and without window / sinks), local-only, per-layer, head groups, top-k
PATTERNS = [
    "dense",
    "D4",
    "D3-W5-P2",
    "D8-W2-P11",
    "local-W6-P3",
    "D4/dense",
    "D4:2+local-W5-P1:2",
    "topk-B4-K2-W3-P2-quest",
    "topk-B3-K3-W0-P0-moba",
    "D2:1+topk-B4-K1-W2-P1:3/local-W3-P0",
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RATPlusLM(ModelConfig.from_preset("tiny")).eval()


def _decode(model, ids, pattern, n, chunks=None):
    """Prefill n tokens, then the rest one by one (or in the given chunk sizes). Logits (B, T, V)."""
    cache = RATPlusCache(model.config, pattern, ids.shape[0], ids.shape[1])
    out = [model(ids[:, :n], pattern=pattern, cache=cache)]
    pos = n
    for size in chunks or [1] * (ids.shape[1] - n):
        out.append(model(ids[:, pos : pos + size], cache=cache))
        pos += size
    assert cache.seq_len == pos == ids.shape[1]
    return torch.cat(out, dim=1)


# ---- slot arithmetic -------------------------------------------------------------------------------


def _keyset(t, D, W, P):
    """docs/DESIGN.md section 3 key set of query t, as a literal set."""
    local = {p for p in range(t + 1) if t - W <= p <= t}
    initial = {p for p in range(t + 1) if p < P}
    dilated = set() if D is None else {p for p in range(t + 1) if (p + 1) % D == 0 and p >= P and p < t - W}
    return local | initial | dilated


@pytest.mark.parametrize("D, W, P", [(1, 0, 0), (4, 0, 0), (3, 5, 2), (None, 4, 3), (5, 0, 12), (2, 9, 0)])
def test_slots_hold_exactly_the_next_querys_keys(D, W, P):
    """Writing token by token (and by chunks via ``plan``), the filled prefix after n tokens holds
    exactly S(n - 1), the key set of the last query (so after writing token n it is S(n))."""
    pattern = AttentionPattern(D, W, P)
    max_len = 60
    layout = SlotLayout.for_pattern(pattern, max_len)
    assert layout.capacity == pattern.kv_slots(max_len - 1)
    slots = [-1] * layout.capacity  # the position stored in each slot
    for n in range(max_len):
        held = layout.positions(n).tolist()
        assert held == slots[: layout.num_valid(n)]
        assert set(held) == (_keyset(n - 1, D, W, P) if n else set()) and len(held) == len(set(held))
        move_src, move_dst, dst = layout.step(n)
        if move_src is not None:
            slots[move_dst] = slots[move_src]
        slots[dst] = n
    for chunk in (2, 3, 7, 60):  # several tokens at a time must reach the same layout
        slots = [-1] * layout.capacity
        for n in range(0, max_len, chunk):
            N = min(max_len, n + chunk)
            ring_src, ring_dst, new_src, new_dst = layout.plan(n, N)
            moved = [slots[s] for s in ring_src.tolist()]
            for d, p in zip(ring_dst.tolist(), moved):
                slots[d] = p
            for c, d in zip(new_src.tolist(), new_dst.tolist()):
                slots[d] = n + c
            assert slots[: layout.num_valid(N)] == layout.positions(N).tolist()


# ---- decode == full forward ---------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n", [16, 19])  # on and off a multiple of D (and of the top-k block size)
def test_prefill_plus_decode_equals_full_forward(model, pattern, n):
    torch.manual_seed(n)
    ids = torch.randint(0, 256, (2, n + 9))
    with torch.no_grad():
        full = model(ids, pattern=pattern)
        torch.testing.assert_close(_decode(model, ids, pattern, n), full, rtol=1e-5, atol=1e-5)
        # several tokens per call after the prefill take the masked path
        torch.testing.assert_close(_decode(model, ids, pattern, n, chunks=[3, 1, 5]), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["D4-W3-P2", "topk-B4-K2-W3-P2-moba", "local-W5-P1"])
def test_decode_is_exact_in_float64(pattern):
    torch.manual_seed(0)
    model = RATPlusLM(ModelConfig.from_preset("tiny")).double().eval()
    ids = torch.randint(0, 256, (1, 40))
    cache = RATPlusCache(model.config, pattern, 1, 40, dtype=torch.float64)
    with torch.no_grad():
        steps = [model(ids[:, :1], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(1, 40)]
        torch.testing.assert_close(torch.cat(steps, 1), model(ids, pattern=pattern), rtol=1e-12, atol=1e-12)


def test_attention_baseline_decodes(model):
    torch.manual_seed(0)
    base = RATPlusLM(ModelConfig.from_preset("tiny", apply_re=False)).eval()
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(_decode(base, ids, "D4-W2-P1", 13), base(ids, pattern="D4-W2-P1"))
    assert all(layer.state is None for layer in RATPlusCache(base.config, "D4", 1, 8).layers)


def test_sparse_decode_differs_from_dense(model):
    # guards against the cache silently keeping every key
    ids = torch.randint(0, 256, (1, 60))
    with torch.no_grad():
        assert (_decode(model, ids, "D8", 20) - _decode(model, ids, "dense", 20)).abs().max() > 1e-3


def test_left_padded_rows_match_running_alone(model):
    """Rows of different prompt lengths (left padding) give each row's own logits, in the prefill,
    in decode steps and in a multi-token append."""
    lens, m = [9, 4, 13], 6
    torch.manual_seed(1)
    for pattern in ["D3-W2-P1", "topk-B3-K1-W2-P1-quest", "D4:2+local-W3-P1:2"]:
        rows = [torch.randint(0, 256, (1, L + m)) for L in lens]
        T = max(lens)
        ids = torch.zeros(3, T, dtype=torch.long)
        mask = torch.zeros(3, T, dtype=torch.long)
        for r, L in enumerate(lens):
            ids[r, T - L :], mask[r, T - L :] = rows[r][0, :L], 1
        cache = RATPlusCache(model.config, pattern, 3, T + m)
        with torch.no_grad():
            prefill = model(ids, pattern=pattern, cache=cache, attention_mask=mask)
            cols = [torch.cat([rows[r][:, lens[r] + i : lens[r] + i + 1] for r in range(3)]) for i in range(3)]
            steps = [model(c, cache=cache) for c in cols]
            rest = torch.cat([rows[r][:, lens[r] + 3 :] for r in range(3)])  # 3 tokens at once, HF-style full mask
            steps.append(model(rest, cache=cache, attention_mask=torch.ones(3, T + m)))
            decoded = torch.cat(steps, dim=1)
            for r, L in enumerate(lens):
                alone = model(rows[r], pattern=pattern)[0]
                torch.testing.assert_close(prefill[r, T - L :], alone[:L], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(decoded[r], alone[L:], rtol=1e-5, atol=1e-5)
        assert cache.lengths == [L + m for L in lens] and cache.seq_len == T + m


# ---- growth and the fixed-shape step -------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
def test_grown_cache_decodes_like_one_built_big(model, pattern):
    """A cache grown mid-decode (twice) holds the same slots, summaries and state as one built for
    the whole length from the start, so it gives the same logits; and its bytes are the big one's."""
    torch.manual_seed(4)
    ids = torch.randint(0, 256, (2, 60))
    big = RATPlusCache(model.config, pattern, 2, 60)
    small = RATPlusCache(model.config, pattern, 2, 21)
    with torch.no_grad():
        ref = [model(ids[:, :20], cache=big)] + [model(ids[:, t : t + 1], cache=big) for t in range(20, 60)]
        out = [model(ids[:, :20], cache=small)]
        for t in range(20, 60):
            if t == small.max_len:
                small.grow(t + 17 if t < 40 else 60)
            out.append(model(ids[:, t : t + 1], cache=small))
    assert small.max_len == 60 and small.nbytes() == big.nbytes()
    torch.testing.assert_close(torch.cat(out, dim=1), torch.cat(ref, dim=1), rtol=0, atol=0)
    for a, b in zip(small.layers, big.layers):
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.equal(x, y)


def test_grow_refuses_bad_sizes(model):
    cache = RATPlusCache(model.config, "D4", 1, 30)
    for bad in (29, 2.5, model.config.max_seq_len + 1):
        with pytest.raises(ValueError, match="max_len"):
            cache.grow(bad)


@pytest.mark.parametrize("pattern", ["dense", "D3-W2-P1", "D8-W2-P11", "local-W4-P2", "D4:2+local-W3-P1:2", "D4/dense"])
def test_fixed_step_matches_the_reference_step_on_ragged_rows(model, pattern):
    """``decode_step`` (index-tensor writes, positions as a tensor, a mask over every slot) gives the
    logits of the reference step ``model(token, cache=cache)`` for left-padded rows of different
    lengths, and leaves the cache holding the same slots."""
    assert RATPlusCache(model.config, pattern, 1, 8).supports_fixed_step
    torch.manual_seed(5)
    lens, T, m = [9, 4, 13], 13, 25
    ids = torch.randint(0, 256, (3, T))
    mask = (torch.arange(T) >= torch.tensor([T - n for n in lens]).unsqueeze(1)).long()
    steps = torch.randint(0, 256, (3, m))
    ref_cache, cache = (RATPlusCache(model.config, pattern, 3, T + m) for _ in range(2))
    with torch.no_grad():
        model(ids, cache=ref_cache, attention_mask=mask)
        model(ids, cache=cache, attention_mask=mask)
        held = torch.tensor(cache.lengths)
        for t in range(m):
            ref = model(steps[:, t : t + 1], cache=ref_cache)[:, -1]
            out = model.decode_step(steps[:, t : t + 1], cache, held)
            held = held + 1
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert cache.lengths == ref_cache.lengths == [n + m for n in lens]
    for a, b in zip(cache.layers, ref_cache.layers):
        for g, h in zip(a.groups, b.groups):
            valid = g.layout.num_valid(max(lens) + m)
            torch.testing.assert_close(g.k[:, :, :valid], h.k[:, :, :valid], rtol=1e-5, atol=1e-5)


def test_topk_has_no_fixed_step(model):
    assert not RATPlusCache(model.config, "D2:1+topk-B4-K1-W2-P1:3", 1, 8).supports_fixed_step


@pytest.mark.slow
def test_compiled_fixed_step_gives_the_same_tokens(model):
    """``torch.compile(fullgraph=True)`` captures ``decode_step_core`` as one graph (no host reads, no
    branches on values) and greedy decoding with it picks the same tokens as the reference step."""
    pattern = "D4-W3-P2"
    torch.manual_seed(6)
    ids = torch.randint(0, 256, (2, 12))
    core = torch.compile(model.decode_step_core, fullgraph=True, dynamic=False)
    ref_cache, cache = (RATPlusCache(model.config, pattern, 2, 40) for _ in range(2))
    with torch.no_grad():
        ref_tok = tok = model(ids, cache=ref_cache)[:, -1].argmax(-1, keepdim=True)
        model(ids, cache=cache)
        held = torch.tensor(cache.lengths)
        ref, out = [], []
        for _ in range(20):
            ref_tok = model(ref_tok, cache=ref_cache)[:, -1].argmax(-1, keepdim=True)
            cache.begin_fixed_step(held)
            tok = core(tok, cache, held).argmax(-1, keepdim=True)
            cache.end_fixed_step()
            held = held + 1
            ref.append(ref_tok)
            out.append(tok)
    assert torch.equal(torch.cat(out, dim=1), torch.cat(ref, dim=1))


# ---- memory --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, D, W, P",
    [("dense", 1, 0, 0), ("D4", 4, 0, 0), ("D16-W8-P4", 16, 8, 4), ("D5-W3-P2", 5, 3, 2), ("local-W7-P2", None, 7, 2)],
)
@pytest.mark.parametrize("T", [100, 163])
def test_nbytes_is_the_formula(pattern, D, W, P, T):
    """KV bytes at context T = (P + W + 1 + floor(T / D)) slots x 2 x H x K x itemsize per layer plus
    the float32 state (B x H x 2K); dense: T + 1 slots. The cache holds T + 1 tokens (the context
    and the token being decoded)."""
    config = ModelConfig.from_preset("tiny")
    B, L, H, K = 3, config.num_layers, config.num_heads, config.head_dim
    cache = RATPlusCache(config, pattern, B, T + 1)
    slots = T + 1 if D == 1 else P + W + 1 + (0 if D is None else T // D)
    expected = L * (B * slots * 2 * H * K * 4 + B * H * 2 * K * 4)
    assert cache.nbytes() == expected
    bf16 = RATPlusCache(config, pattern, B, T + 1, dtype=torch.bfloat16)
    assert bf16.nbytes() == L * (B * slots * 2 * H * K * 2 + B * H * 2 * K * 4)  # state stays float32


def test_nbytes_topk_and_mixed():
    config = ModelConfig.from_preset("tiny")
    T, B, H, K = 200, 2, config.num_heads, config.head_dim
    # top-k keeps every key (T + 1 slots) plus max and min of each possible candidate block
    cache = RATPlusCache(config, "topk-B8-K2-W16-P4-quest", B, T + 1)
    blocks = (T - 16 - 4) // 8
    layer = B * H * (T + 1) * 2 * K * 4 + B * H * blocks * 2 * K * 4 + B * H * 2 * K * 4
    assert cache.nbytes() == 2 * layer
    # head groups and per-layer patterns: the sum of each group's own formula
    cache = RATPlusCache(config, "D4:1+local-W5-P1:3/dense", B, T + 1)
    layer0 = B * K * 2 * 4 * (1 * (T // 4 + 1) + 3 * (1 + 5 + 1)) + B * H * 2 * K * 4
    layer1 = B * K * 2 * 4 * H * (T + 1) + B * H * 2 * K * 4
    assert cache.nbytes() == layer0 + layer1


def test_nbytes_stays_constant_while_decoding(model):
    cache = RATPlusCache(model.config, "D4-W2-P1", 2, 40)
    before = cache.nbytes()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 30)), cache=cache)
        for _ in range(10):
            model(torch.randint(0, 256, (2, 1)), cache=cache)
    assert cache.nbytes() == before and cache.seq_len == 40


def test_dropped_cache_is_freed_at_once(model):
    # no reference cycle: the memory goes back when the last reference does, not at the next gc pass
    cache = RATPlusCache(model.config, "D4", 1, 30)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 10)), cache=cache)
    ref = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        assert ref() is None
    finally:
        gc.enable()


# ---- reset / select -------------------------------------------------------------------------------------


def test_reset_and_select(model):
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (3, 25))
    with torch.no_grad():
        full = model(ids, pattern="D4-W2-P1")
        cache = RATPlusCache(model.config, "D4-W2-P1", 3, 25)
        model(ids[:, :10], cache=cache)
        cache.reset()
        assert cache.seq_len == 0
        model(ids[:, :10], cache=cache)
        cache.select([2, 0])  # drop row 1, swap the others
        assert cache.batch_size == 2
        out = torch.cat([model(ids[[2, 0], i : i + 1], cache=cache) for i in range(10, 25)], dim=1)
        torch.testing.assert_close(out, full[[2, 0], 10:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_indices"):
        cache.select([5])


# ---- bad input --------------------------------------------------------------------------------------------


def test_bad_input(model):
    config = model.config
    cache = RATPlusCache(config, "D4", 2, 20)
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        with pytest.raises(ValueError, match="differs from the pattern the cache was built for"):
            model(ids, pattern="D8", cache=cache)
        with pytest.raises(ValueError, match="do not fit"):
            model(torch.randint(0, 256, (2, 21)), cache=cache)
        with pytest.raises(ValueError, match="batch size"):
            model(ids[:1], cache=cache)
        with pytest.raises(ValueError, match="empty"):
            model(ids[:, :0], cache=cache)
        with pytest.raises(ValueError, match="vocab_size"):
            model(ids + 1000, cache=cache)
        with pytest.raises(ValueError, match="labels"):
            model(ids, labels=ids, cache=cache)
        with pytest.raises(ValueError, match="needs a cache"):
            model(ids, attention_mask=torch.ones_like(ids))
        with pytest.raises(ValueError, match="left padding"):
            model(ids, cache=cache, attention_mask=torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]]))
        with pytest.raises(ValueError, match="empty"):
            model(ids, cache=cache, attention_mask=torch.tensor([[0] * 5, [1] * 5]))
        assert cache.seq_len == 0  # nothing was written by the refused calls
        model(ids, cache=cache)
        with pytest.raises(ValueError, match="only allowed on the left of the first call"):
            model(ids[:, :1], cache=cache, attention_mask=torch.tensor([[0], [1]]))
        with pytest.raises(ValueError, match="dtype"):
            bf = RATPlusCache(config, "D4", 2, 20, dtype=torch.float64)
            model(ids, cache=bf)
        # an error inside a forward leaves the cache unusable until reset
        assert bf.current_step is None
        with pytest.raises(ValueError, match="reset"):
            model(ids, cache=bf)
        bf.reset()
    with pytest.raises(ValueError, match="max_seq_len"):
        RATPlusCache(config, "D4", 1, config.max_seq_len + 1)
    with pytest.raises(ValueError, match="max_len"):
        RATPlusCache(config, "D4", 1, 0)
    with pytest.raises(ValueError, match="unknown attention pattern"):
        RATPlusCache(config, "D4x", 1, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pattern", ["D4-W3-P2", "topk-B4-K2-W3-P2-quest", "D4:2+local-W5-P1:2"])
def test_decode_equals_full_forward_on_cuda(pattern):
    torch.manual_seed(0)
    model = RATPlusLM(ModelConfig.from_preset("tiny")).cuda().eval()
    ids = torch.randint(0, 256, (2, 40), device="cuda")
    cache = RATPlusCache(model.config, pattern, 2, 40, device="cuda")
    assert cache.nbytes() == RATPlusCache(model.config, pattern, 2, 40).nbytes()
    with torch.no_grad():
        steps = [model(ids[:, :19], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(19, 40)]
        torch.testing.assert_close(torch.cat(steps, 1), model(ids, pattern=pattern), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
@pytest.mark.parametrize(
    "pattern",
    [
        "dense",
        "D4-W8-P2",
        "local-W8-P2",
        "D4-W500-P300",
        "topk-B8-K2-W4-P2-quest",
        "topk-B8-K2-moba",
        "D4:2+local-W8:2",
    ],
)
def test_cache_nbytes_is_what_the_cache_allocates(num_kv_heads, pattern):
    """The formula that sizes a cache before it exists (memory checks, server admission) equals the
    storage the cache then allocates, with and without grouped-query attention."""
    from ratplus.model.cache import cache_nbytes

    if num_kv_heads == 1 and "+" in pattern:
        pytest.skip("two-head groups cannot share one KV head of four query heads (refused by resolve_pattern)")
    over = {} if num_kv_heads is None else {"num_kv_heads": num_kv_heads}
    config = ModelConfig.from_preset("tiny", num_heads=4, **over)
    for batch, max_len in ((1, 40), (3, 97)):
        cache = RATPlusCache(config, pattern, batch, max_len)
        assert cache.nbytes() == cache_nbytes(config, pattern, batch, max_len, torch.float32)


def test_cache_too_big_for_memory_is_refused_before_allocating():
    config = ModelConfig.from_preset("tiny")
    with pytest.raises(ValueError, match=r"a decode cache for 1000000000000 x 64 tokens needs .* GiB available"):
        RATPlusCache(config, "dense", 10**12, 64)

"""transformers integration: AutoModelForCausalLM loading, forward / generate parity with the native
model, the compact cache behind `cache` (`past_key_values` before transformers 5.24), pattern
switching, save/load, bad inputs, no deprecation warnings."""

import json
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from ratplus import generate
from ratplus.hf import (
    RATPlusConfig,
    RATPlusForCausalLM,
    RATPlusHFCache,
    canonical_pattern,
    from_native,
    to_native,
)
from ratplus.hf.modeling import CACHE_KWARG
from tests.hf.conftest import PATTERNS


@pytest.fixture(scope="module")
def loaded(hf_dir) -> RATPlusForCausalLM:
    """The saved folder loaded back through the Auto classes (registration + loading path)."""
    return AutoModelForCausalLM.from_pretrained(hf_dir)


def test_auto_classes_resolve_ratplus(hf_dir, loaded):
    assert isinstance(AutoConfig.from_pretrained(hf_dir), RATPlusConfig)
    assert type(loaded) is RATPlusForCausalLM
    assert loaded.config.attention_pattern == "D4-W8-P2"
    assert not loaded.training
    # the tied head is stored once and tied again on load
    assert loaded.model.head.lm_head.weight is loaded.model.embedding.wte.weight


@pytest.mark.parametrize("pattern", PATTERNS)
def test_forward_matches_native(native, loaded, ids, pattern):
    loaded.set_attention_pattern(pattern)
    with torch.no_grad():
        expected = native(ids, pattern=pattern)
        got = loaded(ids).logits
        override = loaded(ids, attention_pattern="dense").logits  # per-call override, config untouched
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(override, native(ids, pattern="dense"), rtol=0, atol=0)
    assert loaded.config.attention_pattern == canonical_pattern(pattern, native.config)


def test_set_attention_pattern_switches_without_reload(native, hf_dir, ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    weights = model.model.embedding.wte.weight
    with torch.no_grad():
        before = model(ids).logits
        assert model.set_attention_pattern("D16") == "D16-W0-P0"
        after = model(ids).logits
    assert model.model.embedding.wte.weight is weights  # same parameters, nothing reloaded
    torch.testing.assert_close(before, native(ids, pattern="D4-W8-P2"), rtol=0, atol=0)
    torch.testing.assert_close(after, native(ids, pattern="D16"), rtol=0, atol=0)
    assert not torch.equal(before, after)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attention_pattern"] == "D16-W0-P0"


def test_labels_loss_and_gradients_match_native(native, ids):
    model = from_native(native)
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels)
    shifted = torch.full_like(ids, -100)
    shifted[:, :-1] = labels[:, 1:]  # native labels are already next-token targets
    ref = native(ids, labels=shifted).loss
    torch.testing.assert_close(out.loss, ref)
    (g_hf,) = torch.autograd.grad(out.loss, native.backbone.layers[0].seq_layer.in_proj.weight)
    (g_ref,) = torch.autograd.grad(ref, native.backbone.layers[0].seq_layer.in_proj.weight)
    torch.testing.assert_close(g_hf, g_ref)
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize("pattern", PATTERNS)
def test_greedy_generate_matches_ratplus_generate(native, loaded, ids, pattern):
    loaded.set_attention_pattern(pattern)
    expected = generate(native, ids, 12, pattern=pattern)
    cached = loaded.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    recomputed = loaded.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached.sequences, expected)
    assert torch.equal(recomputed, expected)
    cache = getattr(cached, CACHE_KWARG)
    assert isinstance(cache, RATPlusHFCache) and cache.pattern == loaded.config.attention_pattern
    assert cache.get_seq_length() == ids.shape[1] + 12 - 1  # the last token is never fed back


def test_sparse_generate_cache_is_compact(loaded, ids):
    sizes = {}
    for pattern in ("dense", "local-W8-P2"):
        loaded.set_attention_pattern(pattern)
        out = loaded.generate(ids, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
        sizes[pattern] = getattr(out, CACHE_KWARG).nbytes()
    assert 0 < sizes["local-W8-P2"] < sizes["dense"] / 3


def test_left_padded_batch_generates_each_row_as_alone(native, loaded, ids):
    loaded.set_attention_pattern("D4-W8-P2")
    short = ids[1, :20]
    padded = ids.clone()
    padded[1] = 0
    padded[1, -20:] = short
    mask = torch.ones_like(padded)
    mask[1, :-20] = 0
    out = loaded.generate(padded, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    out_nocache = loaded.generate(
        padded, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=False
    )
    alone = [generate(native, ids[:1], 10, pattern="D4-W8-P2"), generate(native, short[None], 10, pattern="D4-W8-P2")]
    assert torch.equal(out[0], alone[0][0])
    assert torch.equal(out[1, -10:], alone[1][0, -10:])
    assert torch.equal(out, out_nocache)


def test_beam_search_reorders_the_compact_cache(loaded, ids):
    loaded.set_attention_pattern("D4-W8-P2")
    cached = loaded.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
    recomputed = loaded.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_cached_steps_match_full_forward(native, loaded, ids):
    """The transformers-style loop: prefill with use_cache=True, then feed one token at a time."""
    loaded.set_attention_pattern("D4-W8-P2")
    with torch.no_grad():
        out = loaded(ids[:, :30], use_cache=True)
        cache = getattr(out, CACHE_KWARG)
        steps = [out.logits]
        for t in range(30, ids.shape[1]):
            # the cache's current name and its pre-5.24 name both reach the same cache
            name = "cache" if t % 2 else "past_key_values"
            step = loaded(ids[:, t : t + 1], **{name: cache})
            assert getattr(step, CACHE_KWARG) is cache and cache.get_seq_length() == t + 1
            steps.append(step.logits)
        full = native(ids, pattern="D4-W8-P2")
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_refuses_what_it_cannot_do(loaded, ids):
    loaded.set_attention_pattern("D4-W8-P2")
    with torch.no_grad():
        cache = getattr(loaded(ids, use_cache=True), CACHE_KWARG)
        with pytest.raises(ValueError, match="built for attention pattern"):
            loaded(ids[:, :1], cache=cache, attention_pattern="dense")
        with pytest.raises(ValueError, match="RATPlusHFCache"):
            loaded(ids, cache=DynamicCache())
        with pytest.raises(ValueError, match="not both"):
            loaded(ids[:, :1], cache=cache, past_key_values=RATPlusHFCache())
    with pytest.raises(NotImplementedError, match="cannot drop tokens"):
        cache.crop(1)
    cache.crop(0)  # a no-op is fine
    with pytest.raises(ValueError, match="RATPlusHFCache"):
        loaded.generate(ids, max_new_tokens=2, **{CACHE_KWARG: DynamicCache()})
    with pytest.raises(ValueError, match="cache_implementation"):
        loaded.generate(ids, max_new_tokens=2, cache_implementation="static")


def test_save_load_round_trip_with_tokenizer(native, tmp_path, ids):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<eos>", "[UNK]", "the", "cat", "sat", "on", "mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = from_native(native, attention_pattern="local-W8-P2", tokenizer=tok)
    model.config.eos_token_id = 0
    model.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "model.safetensors").is_file()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert hf_tok("the cat sat")["input_ids"] == tok.encode("the cat sat").ids
    assert hf_tok.eos_token == "<eos>"

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    saved = {k: v for k, v in back.config.to_dict().items() if k != "_name_or_path"}
    assert saved == {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # a model loaded from a folder with a tokenizer saves it again
    back.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "tokenizer.json").read_text() == (tmp_path / "a" / "tokenizer.json").read_text()
    arch = to_native(back).config.to_dict()
    assert arch.pop("eos_token_id") == 0
    assert arch == {k: v for k, v in native.config.to_dict().items() if k != "eos_token_id"}


def test_bfloat16_load_keeps_dtype(hf_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model(ids).logits.dtype == torch.bfloat16


# ---- bad input: clear errors, never a silently wrong model -----------------------------------
def _copy_folder(src, dst, config_edit=None, weights_edit=None):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    weights = load_file(str(src / "model.safetensors"))
    if weights_edit:
        weights_edit(weights)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("config_edit", "weights_edit", "message"),
    [
        (lambda c: c.update(model_type="ratplus2") or c.pop("auto_map"), None, "ratplus2"),
        # with the loader named in auto_map, transformers asks before running a folder's code
        (lambda c: c.update(model_type="ratplus2"), None, "trust_remote_code=True"),
        (lambda c: c.update(attention_pattern="D0"), None, "dilation_size"),
        (lambda c: c.update(attention_pattern="Q16"), None, "unknown attention pattern"),
        (lambda c: c.update(attention_pattern="D4:3"), None, "covers 3 heads"),
        (lambda c: c.update(d_model=30), None, "not divisible"),
        (None, lambda w: w.pop("model.backbone.layers.1.hidden_layer.fc1.weight"), "missing keys"),
        (None, lambda w: w.pop("model.embedding.wte.weight"), "missing keys: model.embedding.wte.weight"),
        (None, lambda w: w.update({"model.extra.weight": torch.zeros(2)}), "unexpected keys"),
        (
            None,
            lambda w: w.update({"model.backbone.layers.0.seq_layer.in_proj.weight": torch.zeros(128, 32)}),
            r"in_proj.weight: \(128, 32\) vs \(160, 32\)",
        ),
        (lambda c: c.update(apply_re=False), None, "shape mismatches"),
        (None, lambda w: w.update({"model.head.lm_head.weight": torch.zeros(256, 32)}), "differs from the embedding"),
    ],
)
def test_bad_checkpoints_are_refused(hf_dir, tmp_path, config_edit, weights_edit, message):
    bad = _copy_folder(hf_dir, tmp_path / "bad", config_edit, weights_edit)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(bad)


def test_bad_runtime_inputs_are_refused(loaded, ids):
    with pytest.raises(ValueError, match="unknown field 'Q3'"):
        loaded.set_attention_pattern("D16-Q3")
    with pytest.raises(ValueError, match="covers 2 heads"):
        loaded.set_attention_pattern("D4:2")
    with pytest.raises(ValueError, match="per-layer pattern list has 3"):
        loaded(ids, attention_pattern="D2/D4/dense")
    with pytest.raises(ValueError, match="unknown attention pattern"):
        loaded.config.attention_pattern = "sparse"
    assert loaded.config.attention_pattern != "sparse"
    with pytest.raises(ValueError, match="inputs_embeds"):
        loaded(inputs_embeds=torch.zeros(1, 3, 32), use_cache=True)
    with pytest.raises(ValueError, match="d_model=32"):
        loaded(inputs_embeds=torch.zeros(1, 3, 16))
    with pytest.raises(ValueError, match="output_attentions"):
        loaded(ids, output_attentions=True)
    right_padded = torch.ones_like(ids)
    right_padded[0, -3:] = 0
    with pytest.raises(ValueError, match="not left padding"), torch.no_grad():
        loaded(ids, attention_mask=right_padded, use_cache=True)  # the compact cache takes left padding only
    with pytest.raises(ValueError, match="vocab_size=256"):
        loaded(ids + 256)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        RATPlusForCausalLM.from_pretrained("unused", ignore_mismatched_sizes=True)
    with pytest.raises(ValueError, match=r"only supports.*ASSISTED_GENERATION"):
        loaded.generate(ids, max_new_tokens=2, assistant_model=loaded)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam", "padded", "user_cache"])
def test_generate_emits_no_deprecation_warnings(loaded, ids, mode):
    """Every generate path runs with FutureWarning / DeprecationWarning turned into errors (a renamed
    argument in a new transformers release shows up here first)."""
    loaded.set_attention_pattern("D4-W8-P2")
    kwargs = {"max_new_tokens": 4, "pad_token_id": 0}
    if mode == "sample":
        kwargs.update(do_sample=True, top_k=5)
    elif mode == "beam":
        kwargs.update(num_beams=2, do_sample=False)
    elif mode == "padded":
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        kwargs.update(attention_mask=mask, do_sample=False)
    elif mode == "user_cache":
        kwargs.update({CACHE_KWARG: RATPlusHFCache(), "do_sample": False})
    else:
        kwargs.update(do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = loaded.generate(ids, return_dict_in_generate=True, **kwargs)
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + 4)
    assert isinstance(getattr(out, CACHE_KWARG), RATPlusHFCache)


def test_generate_logs_no_deprecation(loaded, ids, caplog):
    """transformers reports some renamed arguments only through its logger, once per process."""
    loaded.set_attention_pattern("D4-W8-P2")
    with caplog.at_level("WARNING"):
        loaded.generate(ids, max_new_tokens=3, do_sample=False)
        with torch.no_grad():
            out = loaded(ids, use_cache=True)
            loaded(ids[:, :1], cache=getattr(out, CACHE_KWARG))
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


def test_caches_are_sized_to_the_request_and_grow(native, loaded, ids):
    """forward(use_cache=True) allocates for its input only (not max_seq_len), generate() for prompt +
    max_new_tokens - 1; feeding past that grows the cache in chunks, with the same logits."""
    from ratplus.bench.decode import formula_bytes
    from ratplus.hf.cache import GROW_CHUNK

    pattern = "D4-W8-P2"
    loaded.set_attention_pattern(pattern)
    config = native.config
    with torch.no_grad():
        out = loaded(ids[:, :20], use_cache=True)
        cache = getattr(out, CACHE_KWARG)
        assert cache.nbytes() == formula_bytes(config, pattern, ids.shape[0], 20, torch.float32)
        steps = [out.logits] + [loaded(ids[:, t : t + 1], cache=cache).logits for t in range(20, ids.shape[1])]
        grown = min(config.max_seq_len, 20 + GROW_CHUNK)
        assert cache.inner.max_len == grown
        assert cache.nbytes() == formula_bytes(config, pattern, ids.shape[0], grown, torch.float32)
        torch.testing.assert_close(torch.cat(steps, dim=1), native(ids, pattern=pattern), rtol=1e-5, atol=1e-5)
    gen = loaded.generate(ids[:, :20], max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert getattr(gen, CACHE_KWARG).nbytes() == formula_bytes(config, pattern, ids.shape[0], 24, torch.float32)


def test_output_loading_info_reports_instead_of_refusing(hf_dir, tmp_path):
    """The caller who asks for the loading report gets it (missing keys listed) instead of the ValueError."""
    bad = _copy_folder(
        hf_dir, tmp_path / "bad", None, lambda w: w.pop("model.backbone.layers.1.hidden_layer.fc1.weight")
    )
    with pytest.raises(ValueError, match="missing keys"):
        RATPlusForCausalLM.from_pretrained(bad)
    model, info = RATPlusForCausalLM.from_pretrained(bad, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["model.backbone.layers.1.hidden_layer.fc1.weight"]
    assert isinstance(model, RATPlusForCausalLM)

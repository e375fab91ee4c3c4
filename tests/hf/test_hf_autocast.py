"""bf16 / fp16 autocast: ``generate`` (dense, sparse, top-k) under autocast, and right after
``Trainer(bf16=True)`` and TRL's ``SFTTrainer`` with its defaults, which leave ``forward`` wrapped in
autocast (the decode cache is then built in autocast's dtype, as the keys are)."""

import pytest
import torch

pytest.importorskip("transformers")

from ratplus import generate
from ratplus.hf import RATPlusConfig, RATPlusForCausalLM
from ratplus.model.cache import RATPlusCache, compute_dtype

PATTERNS = ["dense", "D4-W8-P2", "local-W8-P2", "topk-B8-K2-W8-P2-quest"]


def tiny(pattern: str = "dense", seed: int = 0) -> RATPlusForCausalLM:
    torch.manual_seed(seed)
    config = RATPlusConfig(
        vocab_size=97, d_model=32, num_layers=2, num_heads=4, max_seq_len=64, attention_pattern=pattern
    )
    return RATPlusForCausalLM(config).eval()


def test_compute_dtype_follows_autocast():
    w = torch.zeros(2)
    assert compute_dtype(w) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(w) == torch.bfloat16
        assert compute_dtype(w.double()) == torch.float64  # autocast leaves float64 alone
    with torch.autocast("cpu", dtype=torch.float16):
        assert compute_dtype(w.bfloat16()) == torch.float16


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generate_under_autocast(pattern, dtype):
    """Left-padded batch, greedy: no dtype error; the cache holds autocast's dtype; each cached step's
    logits are those of a full forward under the same autocast (bf16 rounding apart)."""
    model = tiny(pattern)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.autocast("cpu", dtype=dtype):
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        assert cache.inner.layers[0].groups[0].k.dtype == dtype
        seq = out.sequences  # (2, 18)
        full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            full = model(input_ids=seq, attention_mask=full_mask, use_cache=False).logits
    steps = torch.stack(out.logits, dim=1).float()  # (2, 6, V): logits of each generated token
    torch.testing.assert_close(steps, full[:, 11:17].float(), rtol=0, atol=0.06 if dtype == torch.bfloat16 else 0.01)


def test_native_generate_under_autocast():
    model = tiny("D4-W8-P2").native
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, ids, max_new_tokens=4, pattern="D4-W8-P2")
    assert out.shape == (1, 14) and torch.equal(out[:, :10], ids)


def test_cache_of_another_dtype_is_a_clear_error():
    model = tiny("D4-W8-P2").native
    ids = torch.randint(1, 97, (1, 10))
    cache = RATPlusCache(model.config, "D4-W8-P2", 1, 16, dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="compute_dtype"):
        model(ids, cache=cache)


# ---- after the trainers: accelerate leaves forward wrapped in autocast ---------------------------

WORDS = ["<eos>", "[UNK]", "the", "cat", "dog", "sat", "on", "a", "mat", "red", "blue"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model folder with a word-level tokenizer whose EOS doubles as pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ratplus.hf import save_tokenizer

    path = tmp_path_factory.mktemp("tiny-bf16")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    config = RATPlusConfig(vocab_size=len(WORDS), d_model=16, num_layers=1, num_heads=2, max_seq_len=32, eos_token_id=0)
    RATPlusForCausalLM(config).save_pretrained(path)
    save_tokenizer(tok, path, config)
    return path


def _texts() -> list[str]:
    return ["the cat sat on a red mat", "the dog sat on a blue mat", "a cat sat", "the red dog"] * 2


def _generate_left_padded(model, tok, pattern: str) -> torch.Tensor:
    model.set_attention_pattern(pattern)
    tok.padding_side = "left"
    batch = tok(["the cat sat on", "a dog"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    return out


def test_generate_after_trainer_bf16(folder, tmp_path):
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    data = Dataset.from_dict({"text": _texts()}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=4,
        bf16=True,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
    )
    Trainer(
        model=model, args=args, train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok, mlm=False)
    ).train()
    assert hasattr(model.forward, "__wrapped__")  # accelerate's autocast wrapper stays on forward
    for pattern in ("dense", "D2-W2-P1"):
        _generate_left_padded(model.eval(), tok, pattern)


def test_generate_after_sft_trainer_defaults(folder, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=1,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        max_length=16,
    )
    assert args.bf16  # TRL's default (autocast on CPU too)
    trl.SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": _texts()}), processing_class=tok
    ).train()
    for pattern in ("dense", "local-W2-P1"):
        _generate_left_padded(model.eval(), tok, pattern)

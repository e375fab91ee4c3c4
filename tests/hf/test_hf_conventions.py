"""The names other tools read: ``logits_to_keep`` (int and tensor, as in Llama, and what ``generate``
passes), the ``lm_head`` attribute, the standard config names (read-only aliases), ``pad_token_id``
from the tokenizer, ``config.dtype`` after ``.to(dtype)``, and a clear error for an unknown dtype."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from ratplus.hf import RATPlusConfig, RATPlusForCausalLM


def tiny(**overrides) -> RATPlusForCausalLM:
    torch.manual_seed(0)
    values = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, max_seq_len=64)
    values.update(overrides)
    return RATPlusForCausalLM(RATPlusConfig(**values)).eval()


def test_logits_to_keep_int_and_tensor():
    model = tiny()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        assert model(ids, logits_to_keep=0).logits.shape == (2, 11, 61)
        torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:])
        torch.testing.assert_close(model(ids, logits_to_keep=4).logits, full[:, -4:])
        where = torch.tensor([0, 3, 7])
        torch.testing.assert_close(model(ids, logits_to_keep=where).logits, full[:, where])
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)
    with pytest.raises(ValueError, match="kept logits"):
        model(ids, logits_to_keep=3, labels=ids)


def test_generate_asks_for_the_last_logits_only():
    """GenerationMixin passes logits_to_keep=1 to a forward that takes it: the prefill's logits are (B, 1, V)."""
    model = tiny()
    assert model._supports_logits_to_keep()
    seen = []
    model.register_forward_hook(lambda m, args, kwargs, out: seen.append(out.logits.shape), with_kwargs=True)
    model.generate(torch.randint(0, 61, (2, 9)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen and all(shape == (2, 1, 61) for shape in seen)


def test_lm_head_attribute_is_the_output_embeddings():
    model = tiny()
    assert model.lm_head is model.get_output_embeddings() is model.model.head.lm_head
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied
    assert not any(name.startswith("lm_head") for name in model.state_dict())  # stored once, native key
    new = torch.nn.Linear(32, 61, bias=False)
    model.lm_head = new
    assert model.model.head.lm_head is new and model.get_output_embeddings() is new


def test_standard_config_names_are_read_only_aliases():
    config = RATPlusConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
    assert config.intermediate_size == 4 * 32
    assert RATPlusConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, ffn_dim=48).intermediate_size == 48
    assert config.head_dim == 8
    assert config.rope_theta == 10000.0
    assert config.hidden_act == "gelu"
    assert RATPlusConfig(d_model=32, num_layers=1, num_heads=4, ffn_act="swiglu").hidden_act == "silu"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 4)
    assert config.num_key_value_heads == 2
    for name in ("intermediate_size", "head_dim", "rope_theta", "hidden_act"):
        with pytest.raises(AttributeError, match=name):
            setattr(config, name, 1)
        assert name not in config.to_dict()  # derived, never stored: the native fields stay the truth


def test_config_dtype_follows_the_weights(tmp_path):
    model = tiny()
    model.to(torch.bfloat16)
    assert model.config.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model.float()
    assert model.config.dtype == torch.float32
    model.half()
    assert model.config.dtype == torch.float16


def test_unknown_dtype_in_config_is_a_clear_error(tmp_path):
    tiny().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["dtype"] = "float99"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="float99"):
        RATPlusForCausalLM.from_pretrained(tmp_path)


def test_pad_token_id_comes_from_the_tokenizer_on_convert(tmp_path):
    """``ratplus convert --to hf`` with a tokenizer whose EOS doubles as pad: config.json and
    generation_config.json name the pad id, so batched generate needs no pad_token_id argument."""
    from tokenizers import Tokenizer, models

    from ratplus import ModelConfig, RATPlusLM
    from ratplus.hf.convert import save_hf

    words = ["<eos>", "a", "b", "c"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    native = RATPlusLM(ModelConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2, max_seq_len=32, eos_token_id=0))
    save_hf(native, tmp_path / "hf", tokenizer=tok)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["pad_token_id"] == 0
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["pad_token_id"] == 0
    back = RATPlusForCausalLM.from_pretrained(tmp_path / "hf")
    assert back.config.pad_token_id == back.generation_config.pad_token_id == 0
    # a folder as the tokenizer source gives the same id
    again = RATPlusForCausalLM.from_pretrained(tmp_path / "hf")
    again.config.pad_token_id = None
    again.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["pad_token_id"] == 0


def test_peft_modules_to_save_lm_head():
    """PEFT's modules_to_save=["lm_head"] (an untied head) finds the head, trains its copy, and
    model.lm_head is then PEFT's wrapper; the logits at step 0 are the base model's."""
    peft = pytest.importorskip("peft")
    model = tiny(tie_embeddings=False)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    lora = peft.LoraConfig(r=4, target_modules=["in_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, lora)
    out = wrapped(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref)
    assert type(model.lm_head).__name__ == "ModulesToSaveWrapper"
    trained = [n for n, p in wrapped.named_parameters() if p.requires_grad and p.grad is not None]
    assert any("lm_head.modules_to_save" in n for n in trained)

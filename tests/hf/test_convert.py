"""Checkpoint conversion: the paper's reference layout (built here, as its trainer saves it) ->
native / Hugging Face folders with identical logits; native <-> HF round trips; refusals."""

import json
import sys
import types

import pytest
import torch

from ratplus import ModelConfig, RATPlusLM
from ratplus.cli import main
from ratplus.hf.convert import (
    convert,
    folder_kind,
    infer_config,
    load_checkpoint_file,
    load_reference_checkpoint,
    load_tokenizer_file,
    normalize_reference_keys,
)
from ratplus.io.folder import load_metadata, load_pretrained, load_tokenizer

C = 32


def _model(apply_re: bool = True, seed: int = 0, **overrides) -> RATPlusLM:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=96, d_model=C, num_layers=3, num_heads=2, max_seq_len=128, apply_re=apply_re)
    return RATPlusLM(ModelConfig(**{**config.to_dict(), **overrides})).eval()


def reference_state_dict(model: RATPlusLM, prefix: str = "", split_gate: bool = False) -> dict[str, torch.Tensor]:
    """The state dict as the reference trainer saves it: every key (tied head included, as
    ``nn.Module.state_dict`` lists it), an optional DDP / torch.compile prefix, and in the older
    layout the forget-gate rows of in_proj in a separate ``fgate_proj``."""
    out = {}
    for key, value in model.state_dict().items():
        value = value.clone()
        if split_gate and key.endswith("seq_layer.in_proj.weight"):
            out[prefix + key] = value[: 4 * C]
            out[prefix + key.replace("in_proj", "fgate_proj")] = value[4 * C :]
        else:
            out[prefix + key] = value
    return out


class _EasyDict(dict):
    """Pickles as ``easydict.EasyDict`` (what the reference trainer stores its config as)."""


def _easydict(tree):
    """A nested dict as the reference trainer pickles its resolved config: EasyDicts all the way down."""
    return _EasyDict({k: _easydict(v) if isinstance(v, dict) else v for k, v in tree.items()})


def save_trainer_checkpoint(path, state, monkeypatch, model_config=None):
    """``torch.save`` of the reference trainer's checkpoint dict, config as an easydict.EasyDict
    (``model_config``: its ``model`` section, by default one without architecture fields)."""
    module = types.ModuleType("easydict")
    _EasyDict.__module__, _EasyDict.__qualname__ = "easydict", "EasyDict"
    module.EasyDict = _EasyDict
    monkeypatch.setitem(sys.modules, "easydict", module)
    config = _easydict({"lr": 8e-4, "model": model_config or {"d_model": C}})
    config.trainer = {"seed": 1}  # attribute state, as EasyDict keeps both
    torch.save({"task": state, "config": config, "step": 7, "optimizer": {"state": {}, "param_groups": []}}, path)
    monkeypatch.delitem(sys.modules, "easydict")  # loading must not need easydict
    return path


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 45), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("apply_re", "prefix", "split_gate"),
    [(True, "", False), (True, "module._orig_mod.", True), (True, "_orig_mod.", False), (False, "module.", False)],
)
def test_reference_checkpoint_gives_identical_logits(tmp_path, monkeypatch, ids, apply_re, prefix, split_gate):
    model = _model(apply_re)
    path = save_trainer_checkpoint(tmp_path / "ckpt.pth", reference_state_dict(model, prefix, split_gate), monkeypatch)
    imported = load_reference_checkpoint(path, num_heads=2, max_seq_len=128)
    assert imported.config == model.config
    assert imported.config.apply_re is apply_re
    assert imported.head.lm_head.weight is imported.embedding.wte.weight
    with torch.no_grad():
        for pattern in ("dense", "D4-W8-P2", "local-W8-P2"):
            torch.testing.assert_close(imported(ids, pattern=pattern), model(ids, pattern=pattern), rtol=0, atol=0)


def test_fgate_rows_go_last(ids):
    model = _model()
    state = normalize_reference_keys(reference_state_dict(model, "module.", split_gate=True))
    key = "backbone.layers.1.seq_layer.in_proj.weight"
    assert torch.equal(state[key], model.state_dict()[key])
    assert not any("fgate" in k for k in state)


def test_config_inference_defaults_and_untied_head(ids):
    model = _model(tie_embeddings=False)  # untied head: kept untied
    state = reference_state_dict(model)
    config = infer_config(state, head_dim=16, max_seq_len=128)
    assert (config.num_heads, config.tie_embeddings, config.ffn_mult, config.num_layers) == (2, False, 4, 3)
    assert config.eos_token_id is None  # only a 32000-token (LLaMA-2) vocabulary implies EOS = 2
    assert (
        infer_config({**state, "embedding.wte.weight": torch.zeros(32000, C)} | _fake_head(32000), 16).eos_token_id == 2
    )


def _fake_head(V):
    return {"head.lm_head.weight": torch.zeros(V, C)}


def test_cli_reference_to_hf_to_native_round_trip(tmp_path, monkeypatch, ids):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = _model()
    ckpt = save_trainer_checkpoint(tmp_path / "ckpt.pth", reference_state_dict(model, "module."), monkeypatch)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))

    hf_dir, native_dir, hf2_dir = tmp_path / "hf", tmp_path / "native", tmp_path / "hf2"
    args = ["convert", str(ckpt), str(hf_dir), "--num-heads", "2", "--max-seq-len", "128"]
    assert main([*args, "--pattern", "D4-W8-P2", "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    assert folder_kind(hf_dir) == "hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert hf.config.attention_pattern == "D4-W8-P2" and hf.config.eos_token_id == 2  # "</s>" of the tokenizer
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids, pattern="D4-W8-P2"), rtol=0, atol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tok("hello world")["input_ids"] == [3, 4] and hf_tok.eos_token == "</s>"

    assert main(["convert", str(hf_dir), str(native_dir)]) == 0  # hf -> native by default
    assert folder_kind(native_dir) == "native"
    native = load_pretrained(native_dir)
    assert load_metadata(native_dir) == {"adapted_pattern": "D4-W8-P2"}
    assert load_tokenizer(native_dir).encode("hello world").ids == [3, 4]
    for key, value in model.state_dict().items():
        assert torch.equal(native.state_dict()[key], value), key

    assert main(["convert", str(native_dir), str(hf2_dir), "--dtype", "bfloat16"]) == 0  # native -> hf
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(hf2_dir)
    assert hf2.dtype == torch.bfloat16 and hf2.config.attention_pattern == "D4-W8-P2"
    assert torch.equal(hf2.model.embedding.wte.weight, model.embedding.wte.weight.bfloat16())

    # an existing model is not overwritten by accident
    assert main(["convert", str(hf_dir), str(native_dir)]) == 2
    assert main(["convert", str(hf_dir), str(native_dir), "--overwrite"]) == 0


def _edit(key, value):
    return lambda s: s.__setitem__(key, value)


def _drop(key):
    return lambda s: s.pop(key)


@pytest.mark.parametrize(
    ("edit", "kwargs", "message"),
    [
        (_drop("backbone.layers.1.hidden_layer.fc2.weight"), {}, "missing keys: backbone.layers.1.hidden_layer.fc2"),
        (_drop("backbone.layers.1.seq_layer.input_norm.weight"), {}, "missing keys"),
        (_drop("embedding.wte.weight"), {}, "no embedding.wte.weight"),
        (_edit("backbone.layers.0.seq_layer.in_proj.weight", torch.zeros(3 * C, C)), {}, r"must be \(5C, C\)"),
        (_edit("backbone.layers.2.seq_layer.in_proj.weight", torch.zeros(4 * C, C)), {}, "shape mismatches"),
        (_edit("backbone.layers.0.hidden_layer.fc2.weight", torch.zeros(C, 2 * C)), {}, "SwiGLU"),
        (_edit("backbone.layers.0.hidden_layer.fc1.bias", torch.zeros(4 * C)), {}, "no biases"),
        (_edit("backbone.layers.0.seq_layer.extra.weight", torch.zeros(2)), {}, "unexpected keys"),
        (_edit("backbone.layers.4.hidden_layer.ln.weight", torch.ones(C)), {}, r"layers \[3\] are missing"),
        (_edit("backbone.layers.0.seq_layer.fgate_proj.weight", torch.zeros(C, C)), {}, r"\(4C, C\) in_proj"),
        (_edit("backbone.ln.weight", torch.ones(C + 1)), {}, r"backbone.ln.weight: \(33,\) vs \(32,\)"),
        (None, {"num_heads": 3}, "not divisible by num_heads=3"),
        (None, {"num_heads": None}, "pass num_heads"),  # C=32 is not a multiple of the paper's head size 128
    ],
)
def test_mismatching_state_dict_is_refused(tmp_path, edit, kwargs, message):
    state = reference_state_dict(_model())
    if edit is not None:
        edit(state)
    torch.save(state, tmp_path / "bad.pth")
    kwargs = {"num_heads": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        load_reference_checkpoint(tmp_path / "bad.pth", **kwargs)


class _Opaque:
    """An arbitrary Python object in a checkpoint: refused unless the file is trusted."""


def test_untrusted_pickle_is_refused_unless_trusted(tmp_path):
    state = reference_state_dict(_model())
    torch.save({"model": state, "extra": _Opaque()}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="trust-pickle"):
        load_checkpoint_file(tmp_path / "ckpt.pt")
    assert set(load_checkpoint_file(tmp_path / "ckpt.pt", trust_pickle=True)) == set(state)


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="truncated or not a PyTorch checkpoint"):
        load_checkpoint_file(tmp_path / "junk.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "nodict.pth")
    with pytest.raises(ValueError, match="has none under task, model"):
        load_checkpoint_file(tmp_path / "nodict.pth")
    with pytest.raises(FileNotFoundError):
        load_checkpoint_file(tmp_path / "missing.pth")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2': neither a RAT\+ model nor a Llama-family"):
        convert(other, tmp_path / "out")
    llama = tmp_path / "llama"  # a Llama config without weights: imported, refused when the weights are read
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="cannot load the weights"):
        convert(llama, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_safetensors_reference_checkpoint(tmp_path, ids):
    from safetensors.torch import save_file

    model = _model()
    state = reference_state_dict(model, "_orig_mod.")
    state.pop("_orig_mod.head.lm_head.weight")  # safetensors cannot store the shared tensor twice
    save_file(state, str(tmp_path / "ckpt.safetensors"))
    convert(tmp_path / "ckpt.safetensors", tmp_path / "native", to="native", num_heads=2, max_seq_len=128)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "native")(ids), model(ids), rtol=0, atol=0)


def test_tokenizer_model_without_sentencepiece_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: the SentencePiece path is taken")
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="sentencepiece"):
        load_tokenizer_file(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json or tokenizer\.model"):
        load_tokenizer_file(tmp_path / "..")


def test_gqa_native_to_hf_to_native(tmp_path, ids):
    """num_kv_heads travels through the HF config (as num_key_value_heads) and back, logits identical."""
    transformers = pytest.importorskip("transformers")
    from ratplus.io.folder import save_pretrained

    model = _model(num_heads=4, num_kv_heads=2)
    save_pretrained(model, tmp_path / "native")
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "hf"), "--pattern", "D4-W8-P2"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.num_kv_heads == 2 and hf.config.num_key_value_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids, pattern="D4-W8-P2"), rtol=0, atol=0)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_pretrained(tmp_path / "back")
    assert back.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_reference_import_keeps_num_kv_heads_equal_num_heads():
    state = reference_state_dict(_model())
    assert infer_config(normalize_reference_keys(state), 2).num_kv_heads == 2


def _stored_model_section(d_model, num_layers, num_head, d_head, max_seq_len=4096):
    """The ``model`` section of the reference trainer's resolved config (configs/model/... of the paper's code)."""
    return {
        "backbone": {
            "d_model": d_model,
            "num_layers": num_layers,
            "seq_cell": {"_name_": "ratplus", "num_head": num_head, "d_head": d_head, "dilation_size": 64},
        },
        "embedding": {"pe": {"_name_": "rope", "base": 10000, "max_seq_len": max_seq_len}},
    }


def test_stored_config_gives_the_head_count(tmp_path, monkeypatch, caplog):
    """A 4-head checkpoint of head size 64 (width 256) converts with 4 heads read from the config the
    reference trainer stored in it (not 2 heads from the paper's head size 128): logits identical in float64."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=96, d_model=256, num_layers=2, num_heads=4, max_seq_len=512)
    model = RATPlusLM(config).double().eval()
    path = save_trainer_checkpoint(
        tmp_path / "ckpt.pth",
        reference_state_dict(model, "_orig_mod."),
        monkeypatch,
        _stored_model_section(256, 2, 4, 64, 512),
    )
    with caplog.at_level("INFO"):
        imported = load_reference_checkpoint(path)
    assert "num_heads=4" in caplog.text and "stored config" in caplog.text
    assert imported.config == config
    ids = torch.randint(0, 96, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for pattern in ("dense", "D16-W8-P2"):
            torch.testing.assert_close(imported(ids, pattern=pattern), model(ids, pattern=pattern), rtol=0, atol=1e-14)
    # an explicit --num-heads wins over the stored config, with a warning saying they disagree
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert load_reference_checkpoint(path, num_heads=2).config.num_heads == 2
    assert "num_heads=2 as given, but the checkpoint's stored config says 4" in caplog.text
    # the CLI reads it too: no --num-heads needed
    assert main(["convert", str(path), str(tmp_path / "native"), "--to", "native"]) == 0
    assert load_pretrained(tmp_path / "native").config.num_heads == 4


@pytest.mark.parametrize(
    ("section", "match"),
    [
        (_stored_model_section(64, 2, 4, 64), "stored config says d_model=64 but its tensors give d_model=256"),
        (_stored_model_section(256, 3, 4, 64), "stored config says num_layers=3 but its tensors give num_layers=2"),
        (_stored_model_section(256, 2, 4, 32), "stored config says head_dim=32 but its tensors give head_dim=64"),
    ],
)
def test_stored_config_that_contradicts_the_tensors_is_refused(tmp_path, monkeypatch, section, match):
    torch.manual_seed(0)
    model = RATPlusLM(ModelConfig(vocab_size=96, d_model=256, num_layers=2, num_heads=4, max_seq_len=512))
    path = save_trainer_checkpoint(tmp_path / "ckpt.pth", reference_state_dict(model), monkeypatch, section)
    with pytest.raises(ValueError, match=match):
        load_reference_checkpoint(path)
    assert main(["convert", str(path), str(tmp_path / "out"), "--to", "native"]) == 2


def test_hf_folder_from_convert_carries_a_manifest(tmp_path):
    from ratplus.io.folder import save_pretrained
    from ratplus.io.manifest import verify_folder

    save_pretrained(_model(), tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "hf", to="hf")
    assert (tmp_path / "hf" / "manifest.json").is_file() and verify_folder(tmp_path / "hf")


def test_convert_of_an_hf_folder_with_an_unsafe_pickle_is_refused(tmp_path, capsys):
    import os

    from ratplus.io.folder import save_pretrained

    save_pretrained(_model(), tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "hf", to="hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    (tmp_path / "hf" / "manifest.json").unlink()  # a folder of another tool: no manifest to refuse it first

    class Unsafe:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"embedding.wte.weight": Unsafe()}, tmp_path / "hf" / "pytorch_model.bin")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ratplus convert: error: ") and "Python objects other than tensors" in err[-1]
    assert not (tmp_path / "back").exists()


def test_convert_to_hf_on_a_full_disk_is_a_write_error(tmp_path, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError: it comes out as the WriteError every other
    writer gives (path, free space), and the partial folder is removed."""
    from safetensors import SafetensorError

    from ratplus.hf import RATPlusForCausalLM
    from ratplus.io.folder import save_pretrained
    from ratplus.runtime import WriteError

    save_pretrained(_model(), tmp_path / "native")

    def disk_full(self, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(RATPlusForCausalLM, "save_pretrained", disk_full)
    with pytest.raises(WriteError, match=r"cannot write .*hf: No space left on device .* free on that disk"):
        convert(tmp_path / "native", tmp_path / "hf", to="hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]


def test_convert_records_inference_only_patterns_as_default_and_checks_the_tokenizer(tmp_path):
    """An inference-only --pattern is recorded as the folder's default pattern, never as a pattern the
    weights were adapted to; a tokenizer with more tokens than the model's vocabulary is refused."""
    from ratplus.io.folder import save_pretrained
    from ratplus.io.tokenizer import train_bpe

    save_pretrained(_model(), tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "snap", to="native", pattern="snapkv-C8-O4")
    meta = load_metadata(tmp_path / "snap")
    assert meta.get("default_pattern") == "snapkv-C8-O4" and "adapted_pattern" not in meta
    convert(tmp_path / "native", tmp_path / "d4", to="native", pattern="D4")
    assert load_metadata(tmp_path / "d4").get("adapted_pattern") == "D4-W0-P0"
    tok = train_bpe(["to be or not to be, that is the question " * 50], 300)
    (tmp_path / "tok.json").write_text(tok.to_str())
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model.s vocabulary is 96"):
        convert(tmp_path / "native", tmp_path / "t", to="native", tokenizer=tmp_path / "tok.json")

"""A saved folder opened by someone else: ``auto_map`` + the loader file (``trust_remote_code=True``
with ratplus installed and not imported), a clear ``pip install`` error without ratplus, TRL's
string path (``SFTTrainer(model="<folder>")``), and the model card."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM

from ratplus.hf import RATPlusConfig, RATPlusForCausalLM
from ratplus.hf.hub import CARD_FILE, INSTALL, LOADER_FILE


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    config = RATPlusConfig(
        vocab_size=61, d_model=32, num_layers=2, num_heads=4, max_seq_len=64, attention_pattern="D4-W8-P2"
    )
    RATPlusForCausalLM(config).save_pretrained(path)
    return path


def _python(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_folder_has_auto_map_loader_and_card(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ratplus.RATPlusForCausalLM"
    assert (folder / LOADER_FILE).is_file()
    card = (folder / CARD_FILE).read_text()
    assert "library_name: ratplus" in card and INSTALL in card and "`D4-W8-P2`" in card
    assert "import ratplus.hf" in card and "trust_remote_code=True" in card


def test_trust_remote_code_loads_without_importing_ratplus(folder, tmp_path):
    """A fresh interpreter that never imports ratplus itself: the Auto class goes through the loader."""
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(0))
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
assert "ratplus" not in sys.modules
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
print(type(model).__name__, model.config.attention_pattern)
print(model(torch.tensor({ids.tolist()})).logits.sum().item())
"""
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    name, pattern, total = out.stdout.split()
    assert (name, pattern) == ("RATPlusForCausalLM", "D4-W8-P2")
    with torch.no_grad():
        here = RATPlusForCausalLM.from_pretrained(folder)(ids).logits.sum().item()
    assert float(total) == pytest.approx(here, rel=1e-5)


def test_without_ratplus_the_error_names_the_install_line(folder, tmp_path):
    code = f"""
import sys
sys.modules["ratplus"] = None  # as if the package were not installed
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
"""
    out = _python(code, tmp_path)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and INSTALL in out.stderr, out.stderr[-3000:]


def test_registered_classes_need_no_trust_remote_code(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)  # ratplus.hf is imported (registered) here
    assert type(model) is RATPlusForCausalLM


def test_trl_string_path_loads_the_folder(folder, tmp_path):
    """SFTTrainer(model="<folder>") once raised AttributeError: 'RATPlusConfig' object has no attribute 'auto_map'."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ratplus.hf import save_tokenizer

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", "[UNK]", "a", "b"])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    save_tokenizer(tok, folder, RATPlusConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, eos_token_id=0))
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
        report_to="none", save_strategy="no", max_length=8, bf16=False,
    )  # fmt: skip
    trainer = trl.SFTTrainer(model=str(folder), args=args, train_dataset=Dataset.from_dict({"text": ["a b a", "b a"]}))
    assert isinstance(trainer.model, RATPlusForCausalLM)
    trainer.train()


def test_a_card_the_user_wrote_is_kept(folder, tmp_path):
    model = RATPlusForCausalLM.from_pretrained(folder)
    out = tmp_path / "mine"
    out.mkdir()
    (out / CARD_FILE).write_text("# my own card\n")
    model.save_pretrained(out)
    assert (out / CARD_FILE).read_text() == "# my own card\n"
    model.save_pretrained(tmp_path / "fresh")
    model.set_attention_pattern("dense")
    model.save_pretrained(tmp_path / "fresh")  # ratplus' own card is rewritten with the new default pattern
    assert "dense causal attention" in (tmp_path / "fresh" / CARD_FILE).read_text()


def test_card_of_a_converted_folder_can_be_edited(tmp_path):
    """convert's manifest covers the model's files but not the model card: editing README.md before
    sharing the folder keeps it loadable (an edited config.json is still refused)."""
    from ratplus import ModelConfig, RATPlusLM
    from ratplus.hf.convert import save_hf

    native = RATPlusLM(ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, max_seq_len=32))
    folder = save_hf(native, tmp_path / "hf", pattern="D4-W2-P1")
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert CARD_FILE not in manifest and LOADER_FILE in manifest and "config.json" in manifest
    (folder / CARD_FILE).write_text("# my card\n")
    assert isinstance(RATPlusForCausalLM.from_pretrained(folder), RATPlusForCausalLM)
    config = json.loads((folder / "config.json").read_text())
    config["attention_pattern"] = "dense"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json"):
        RATPlusForCausalLM.from_pretrained(folder)

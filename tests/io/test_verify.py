"""Model folders are verified against their manifest wherever they are loaded (ratplus.io.manifest)."""

import json
import logging

import pytest
import torch

from ratplus import ModelConfig, RATPlusLM
from ratplus.cli import main
from ratplus.io.folder import load_pretrained, save_pretrained
from ratplus.io.manifest import MANIFEST_FILE, VERIFY_ENV, FolderError, verify_folder


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    model = RATPlusLM(ModelConfig.from_preset("tiny"))
    return save_pretrained(model, tmp_path / "m", metadata={"tokens_seen": 3})


def _flip_last_byte(path):
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def test_save_writes_a_manifest_that_verifies(folder):
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "metadata.json"}
    assert verify_folder(folder) is True
    load_pretrained(folder)


@pytest.mark.parametrize("level", ["sha256", "size"])
def test_truncated_weights_are_refused_at_every_level(folder, level):
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-7])
    with pytest.raises(FolderError, match=r"model.safetensors has .* bytes but manifest.json says"):
        load_pretrained(folder, verify=level)


def test_modified_weights_and_config_are_refused_naming_the_file(folder):
    _flip_last_byte(folder / "model.safetensors")
    with pytest.raises(FolderError, match=r"model\.safetensors does not match its SHA-256"):
        load_pretrained(folder)
    load_pretrained(folder, verify="size")  # the documented opt-out checks sizes only


def test_edited_config_is_refused(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["norm_eps"] = 1e-5  # any change of content is caught
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    with pytest.raises(FolderError, match=r"config.json"):
        load_pretrained(folder)


def test_env_var_selects_the_level(folder, monkeypatch):
    _flip_last_byte(folder / "model.safetensors")
    monkeypatch.setenv(VERIFY_ENV, "size")
    load_pretrained(folder)
    monkeypatch.setenv(VERIFY_ENV, "md5")
    with pytest.raises(ValueError, match=f"{VERIFY_ENV} must be one of sha256, size"):
        load_pretrained(folder)


@pytest.mark.parametrize(
    "text",
    ["", "{not json", "[]", '{"files": {}}', '{"files": 3}', '{"files": {"model.safetensors": {"bytes": "1"}}}'],
)
def test_empty_or_malformed_manifest_is_an_error(folder, text):
    (folder / MANIFEST_FILE).write_text(text)
    with pytest.raises(FolderError, match=r"manifest.json"):
        load_pretrained(folder)


def test_manifest_must_cover_the_weights(folder):
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    del manifest["files"]["model.safetensors"]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(FolderError, match=r"does not cover model.safetensors"):
        load_pretrained(folder)


def test_folder_without_manifest_loads_with_a_note(folder, caplog):
    (folder / MANIFEST_FILE).unlink()
    with caplog.at_level(logging.INFO, logger="ratplus"):
        load_pretrained(folder)
    notes = [r.getMessage() for r in caplog.records if MANIFEST_FILE in r.getMessage()]
    assert len(notes) == 1 and "unverified" in notes[0]
    with pytest.raises(FolderError, match=r"no manifest.json"):
        verify_folder(folder)  # a checkpoint (require=True) must have one


def test_every_loader_refuses_a_damaged_folder(folder, tmp_path, capsys):
    """generate, eval, convert, ratplus.hf.from_native and the lm-eval model all load through the check."""
    _flip_last_byte(folder / "model.safetensors")
    argvs = [
        ["generate", "--ckpt", folder, "--prompt-ids", "1,2", "--max-new-tokens", "1"],
        ["eval", "niah", "--ckpt", folder, "--lengths", "64", "--num-samples", "1", "--out", tmp_path / "e", "--quiet"],
        ["convert", folder, tmp_path / "hf", "--to", "hf"],
        ["adapt", "--ckpt", folder, "--pattern", "D4", "--steps", "1", "--out", tmp_path / "a"],
    ]
    for argv in argvs:
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "model.safetensors does not match its SHA-256" in err and len(err.splitlines()) == 1, (argv, err)
    pytest.importorskip("transformers")
    from ratplus.hf import from_native

    with pytest.raises(FolderError, match=r"model.safetensors"):
        from_native(folder)
    pytest.importorskip("lm_eval")
    from ratplus.eval.harness import RATPlusHarnessLM

    with pytest.raises(FolderError, match=r"model.safetensors"):
        RATPlusHarnessLM(ckpt=str(folder), device="cpu")


def test_off_loads_a_folder_edited_on_purpose_and_every_refusal_names_it(folder, caplog):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_base"] = 500000.0
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FolderError, match=r"config\.json .*RATPLUS_VERIFY=off \(or verify='off'\) loads it unchecked"):
        load_pretrained(folder)
    with caplog.at_level(logging.INFO, logger="ratplus"):
        assert load_pretrained(folder, verify="off").config.rope_base == 500000.0
    assert any("without checking" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("key", "value"), [("rope_base", 500000.0), ("max_seq_len", 4096)])
def test_hf_folder_edited_after_writing_is_refused_on_load_and_convert(
    folder, tmp_path, capsys, monkeypatch, key, value
):
    """A Hugging Face folder carries the manifest too (convert and save_pretrained write it): an edit of
    its config.json is refused by from_pretrained and by convert, as for a native folder, unless the
    check is switched off on purpose."""
    pytest.importorskip("transformers")
    from ratplus.hf import RATPlusForCausalLM
    from ratplus.hf.convert import convert

    hf_dir = tmp_path / "hf"
    convert(folder, hf_dir, to="hf")
    assert verify_folder(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg[key] = value
    (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    with pytest.raises(FolderError, match=r"config\.json does not match its SHA-256.*RATPLUS_VERIFY=off"):
        RATPlusForCausalLM.from_pretrained(hf_dir)
    assert main(["convert", str(hf_dir), str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ratplus convert: error: ") and "RATPLUS_VERIFY=off" in err[-1], err
    assert not (tmp_path / "back").exists()
    # on purpose: the switch, as a keyword or the environment
    assert getattr(RATPlusForCausalLM.from_pretrained(hf_dir, verify="off").native.config, key) == value
    monkeypatch.setenv(VERIFY_ENV, "off")
    assert main(["convert", str(hf_dir), str(tmp_path / "back")]) == 0
    assert getattr(load_pretrained(tmp_path / "back").config, key) == value


def test_hf_save_pretrained_over_a_signed_folder_drops_the_stale_manifest(folder, tmp_path):
    """save_pretrained (which transformers' tools and Trainers rewrite after) writes no manifest, and
    removes the one convert wrote there before: the folder then loads as a folder of another tool."""
    pytest.importorskip("transformers")
    from ratplus.hf import RATPlusForCausalLM, from_native
    from ratplus.hf.convert import convert

    out = tmp_path / "hf"
    convert(folder, out, to="hf")
    assert (out / MANIFEST_FILE).is_file()
    model = from_native(folder)
    with torch.no_grad():
        model.native.embedding.wte.weight.add_(1.0)  # other weights: the old manifest would refuse them
    model.save_pretrained(out)
    assert not (out / MANIFEST_FILE).exists()
    back = RATPlusForCausalLM.from_pretrained(out)
    assert torch.equal(back.native.embedding.wte.weight, model.native.embedding.wte.weight)

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

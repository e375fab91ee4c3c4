"""docs/guides/finetune-hf.md runs as written: its Python blocks, in order, in a fresh folder."""

import re
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guides" / "finetune-hf.md"


def test_guide_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(GUIDE), "exec"), scope)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("loss ")]
    first, last = (float(x) for x in line.removeprefix("loss ").split(" -> "))
    assert last < first  # the LoRA fine-tune lowered the loss
    assert (tmp_path / "lora-adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "hf-model-tuned" / "model.safetensors").is_file()
    assert scope["out"].shape[1] == scope["prompt"]["input_ids"].shape[1] + 4

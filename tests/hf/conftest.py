"""Shared fixtures: a tiny seeded RAT+ model, its HF wrapper and a saved HF folder."""

import pytest
import torch

from ratplus import ModelConfig, RATPlusLM

# Several patterns, one per kind: dense, dilated with window and sinks, local only, per-head
# groups, top-k blocks, per-layer list.
PATTERNS = ["dense", "D4-W8-P2", "local-W8-P2", "D4:2+local-W8-P1:2", "topk-B8-K2-W8-P2-quest", "D2/dense"]


@pytest.fixture(scope="module")
def native() -> RATPlusLM:
    torch.manual_seed(0)
    return RATPlusLM(ModelConfig.from_preset("tiny", eos_token_id=None)).eval()


@pytest.fixture(scope="module")
def hf_dir(native, tmp_path_factory):
    pytest.importorskip("transformers")
    from ratplus.hf import from_native

    path = tmp_path_factory.mktemp("hf")
    from_native(native, attention_pattern="D4-W8-P2").save_pretrained(path)
    return path


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))

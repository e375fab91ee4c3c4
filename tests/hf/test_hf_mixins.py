"""transformers' own model tests, run against RATPlusModel / RATPlusForCausalLM as a peer suite.

``ModelTesterMixin`` comes from ``tests/test_modeling_common.py`` in the source distribution of the
installed transformers release, fetched by ``pip download`` into a cache folder the first time
(``$RATPLUS_CACHE``, default ``~/.cache/ratplus``; nothing is copied into this repository). The
module is skipped with the reason when the sdist cannot be had (offline, no pip).

The sdist carries ``tests/test_modeling_common.py`` but not the ``tests/generation`` and
``tests/exporters`` packages it imports, so those two names are given empty placeholders:
``GenerationTesterMixin`` cannot be run (generation is covered by tests/hf/test_hf_model.py) and
the export tests do not exist. Every test RAT+ cannot pass is skipped below with its reason.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import types
import unittest
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip(
    "parameterized", reason="transformers' model tests need `parameterized` (pip install parameterized)"
)

import torch
import transformers

from ratplus.hf import RATPlusConfig, RATPlusForCausalLM, RATPlusModel

PACKAGE = "_transformers_sdist_tests"


def _sdist_tests() -> Path:
    """tests/ of the installed transformers' sdist, downloaded and unpacked once into the cache."""
    version = transformers.__version__
    root = Path(os.environ.get("RATPLUS_CACHE", Path.home() / ".cache" / "ratplus")) / "transformers-sdist"
    tests = root / f"transformers-{version}" / "tests"
    if (tests / "test_modeling_common.py").is_file():
        return tests
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"transformers-{version}.tar.gz"
    if not archive.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(root)]
        try:
            done = subprocess.run([*cmd, f"transformers=={version}"], capture_output=True, text=True, timeout=300)
            why = done.stderr.strip()[-300:]
        except (OSError, subprocess.TimeoutExpired) as e:
            done, why = None, str(e)
        if done is None or done.returncode != 0 or not archive.is_file():
            pytest.skip(f"cannot download the transformers {version} sdist: {why}", allow_module_level=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"transformers-{version}/tests/")]
        tar.extractall(root, members=members, filter="data")
    if not (tests / "test_modeling_common.py").is_file():
        pytest.skip(f"the transformers {version} sdist has no tests/test_modeling_common.py", allow_module_level=True)
    return tests


def _import_common():
    """``test_modeling_common`` as a module of a package rooted at the sdist's tests/ folder."""
    tests = _sdist_tests()
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(tests)]
        sys.modules[PACKAGE] = package
        # Imported by test_modeling_common but not shipped in the sdist: empty placeholders.
        for name, cls in (
            ("exporters.test_export", "ExportTesterMixin"),
            ("generation.test_utils", "GenerationTesterMixin"),
        ):
            parent = f"{PACKAGE}.{name.split('.')[0]}"
            sys.modules.setdefault(parent, types.ModuleType(parent)).__path__ = []
            module = types.ModuleType(f"{PACKAGE}.{name}")
            setattr(module, cls, type(cls, (), {}))
            sys.modules[module.__name__] = module
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")


common = _import_common()


class RATPlusModelTester:
    """Builds the tiny config and inputs the mixin asks for (as transformers' per-model testers do)."""

    def __init__(self, parent, batch_size=2, seq_length=7, vocab_size=99, hidden_size=32, num_hidden_layers=2):
        self.parent = parent
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = hidden_size, num_hidden_layers, 4
        self.is_training = True

    def get_config(self) -> RATPlusConfig:
        return RATPlusConfig(
            vocab_size=self.vocab_size,
            d_model=self.hidden_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            max_seq_len=64,
            attention_pattern="D2-W2-P1",  # a sparse pattern, so the sparse kernels are what gets tested
            pad_token_id=0,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        mask = torch.ones_like(input_ids)
        mask[0, :2] = 0  # left padding: the one kind both the full forward and the compact cache take
        return self.get_config(), {"input_ids": input_ids, "attention_mask": mask}


SKIPS = {
    # features RAT+ does not have
    "test_attention_outputs": "RAT+ never forms attention weight matrices (output_attentions is refused)",
    "test_resize_position_embeddings": "RoPE: no position embedding table to resize",
    "test_resize_position_vector_embeddings": "RoPE: no position embedding table to resize",
    "test_generation_tester_mixin_inheritance": (
        "GenerationTesterMixin is not in the transformers sdist (tests/generation is not shipped); "
        "generation is tested in tests/hf/test_hf_model.py"
    ),
}


# Tests run on one of the two classes only, with the reason the other one is left out.
ONE_CLASS: dict[str, tuple[type, str]] = {}
# The backbone has no loss: transformers' own suites leave base models out of these through its
# MODEL_MAPPING_NAMES table, which a model outside transformers is not in.
for _name in (
    "test_training",
    "test_training_gradient_checkpointing",
    "test_training_gradient_checkpointing_use_reentrant_false",
    "test_training_gradient_checkpointing_use_reentrant_true",
):
    ONE_CLASS[_name] = (RATPlusForCausalLM, "the backbone has no loss")


class RATPlusModelMixinTest(common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (RATPlusModel, RATPlusForCausalLM)
    has_attentions = False
    test_resize_position_embeddings = False

    def setUp(self):
        self.model_tester = RATPlusModelTester(self)
        kept = ONE_CLASS.get(self._testMethodName)
        if kept is not None:
            self.all_model_classes = (kept[0],)

    def _prepare_config_and_inputs_for_retain_grad_hidden_states_attentions(self):
        """Without the left padding of the common inputs: the mixin backpropagates from the first output
        value, row 0's first position, which is padded there; a padded position has no context, so its
        output (zero logits) depends on nothing and no gradient reaches the hidden states."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
        return config, inputs

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """As the mixin, plus causal-LM labels for RATPlusForCausalLM (the mixin finds the classes that
        take them in transformers' own tables)."""
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels and model_class is RATPlusForCausalLM:
            inputs_dict["labels"] = inputs_dict["input_ids"].clone()
        return inputs_dict


for _name, _reason in SKIPS.items():
    setattr(RATPlusModelMixinTest, _name, unittest.skip(_reason)(lambda self: None))

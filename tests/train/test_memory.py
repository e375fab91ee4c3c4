"""The memory plan: its arithmetic by hand for the tiny preset, its activation coefficients against the
tensors autograd really saves, the refusal with numbers and options that do fit, ``--dry-run``."""

import pytest
import torch
import torch.nn.functional as F

from ratplus.cli import main
from ratplus.config import ModelConfig
from ratplus.model.rat import RATPlusLM
from ratplus.train import memory
from ratplus.train.memory import GiB, check_plan, fitting_options, layer_activation_bytes, plan_memory


def test_tiny_preset_by_hand():
    cfg = ModelConfig.from_preset("tiny")  # V 256, C 32, L 2, H 4, F 128, kv 32, tied head
    P = 256 * 32 + 2 * ((2 * 32 + 3 * 32) * 32 + 32 * 32 + 2 * 128 * 32 + 2 * 32) + 32
    assert P == 37024 == cfg.num_params()
    plan = plan_memory(cfg, micro_batch=2, seq_len=32, device="cpu", sparse=True, available=2**40)
    assert (plan.weights, plan.gradients, plan.optimizer) == (4 * P, 4 * P, 8 * P)
    per_layer = 4 * (15 * 32 + 2 * 128 + 3 * 4) + 16 * 32 + 8 * 32  # float32, recurrence, sparse keys
    assert per_layer == 3760 == layer_activation_bytes(cfg, sparse=True, bf16=False)
    tokens = 2 * 32
    assert plan.activations == tokens * 2 * per_layer
    assert plan.head == tokens * (16 * 32 + 12 * 256)
    tensors = 16 * P + tokens * (2 * per_layer + 16 * 32 + 12 * 256)
    assert plan.total == tensors + memory.CPU_RUNTIME + int(0.15 * tensors)  # glibc keeps freed blocks
    # checkpointing every block: each keeps its input (C floats), backward recomputes one block
    ckpt = plan_memory(cfg, 2, 32, "cpu", checkpoint_every=1, sparse=True, available=2**40)
    assert ckpt.activations == tokens * (2 * 4 * 32 + per_layer)
    every2 = plan_memory(cfg, 2, 32, "cpu", checkpoint_every=2, sparse=True, available=2**40)
    assert every2.activations == tokens * (4 * 32 + per_layer + per_layer)
    # FSDP over 4 processes: a quarter of the state, plus one block gathered (and one prefetched)
    block = (P - 256 * 32) // 2
    fsdp = plan_memory(cfg, 2, 32, "cpu", processes=4, mode="fsdp", sparse=True, available=2**40)
    assert fsdp.weights == 4 * P // 4 + 8 * block and fsdp.optimizer == 8 * P // 4
    ddp = plan_memory(cfg, 2, 32, "cpu", processes=4, mode="ddp", sparse=True, available=2**40)
    assert ddp.weights == 4 * P and ddp.gradients == 8 * P  # buckets


def _saved_bytes_per_token_layer(cfg: ModelConfig, pattern: str, T: int = 128) -> float:
    """Bytes autograd saves per token per layer (activations only: parameters left out), from two
    depths so the embedding and head cancel."""

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        m = RATPlusLM(ModelConfig.from_dict({**cfg.to_dict(), "num_layers": layers}))
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        x = torch.randint(0, cfg.vocab_size, (1, T))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.cross_entropy(m(x, pattern=pattern).flatten(0, 1), x.flatten())
        return sum(seen.values())

    return (saved(2) - saved(1)) / T


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_kv_heads": 2}, {"apply_re": False}, {"ffn_mult": 2}, {"num_heads": 8}, {"d_model": 96, "num_heads": 3}],
)
@pytest.mark.parametrize("pattern", ["dense", "D64-W0-P0"])
def test_activation_coefficients_match_the_saved_tensors(overrides, pattern):
    if pattern != "dense" and overrides.get("apply_re") is False:
        pattern = "local-W64-P0"  # the baseline's sparse branch
    cfg = ModelConfig.from_dict({"vocab_size": 256, "d_model": 64, "num_heads": 4, "max_seq_len": 256, **overrides})
    measured = _saved_bytes_per_token_layer(cfg, pattern)
    estimate = layer_activation_bytes(cfg, sparse=pattern != "dense", bf16=False)
    assert estimate == pytest.approx(measured, rel=0.1)


def test_refusal_names_the_numbers_and_options_that_fit():
    cfg = ModelConfig.from_preset("125m")
    plan = plan_memory(cfg, micro_batch=8, seq_len=2048, device="cpu", sparse=True, available=12 * GiB)
    assert not plan.fits
    with pytest.raises(ValueError) as e:
        check_plan(plan, cfg, sparse=True)
    msg = str(e.value)
    assert f"{plan.total / GiB:.2f} GiB per process" in msg and "12.00 GiB are available on cpu" in msg
    assert "--batch-size 2 --grad-accum 4" in msg and "--activation-checkpointing 1" in msg
    # every option offered really fits
    smaller = plan_memory(cfg, micro_batch=2, seq_len=2048, device="cpu", sparse=True, available=12 * GiB)
    ckpt = plan_memory(cfg, 8, 2048, "cpu", checkpoint_every=1, sparse=True, available=12 * GiB)
    assert smaller.fits and ckpt.fits
    # a model whose state alone is too big: only more memory or sharding helps, and the CPU says so
    big = plan_memory(ModelConfig.from_preset("1.5b"), 1, 512, "cpu", sparse=True, available=18 * GiB)
    assert any("alone need" in o for o in fitting_options(big, ModelConfig.from_preset("1.5b"), True))
    # on GPUs, more processes with FSDP is an option
    gpu = plan_memory(ModelConfig.from_preset("1.5b"), 1, 4096, "cuda", sparse=True, bf16=True, available=16 * GiB)
    assert any("--distributed fsdp" in o for o in fitting_options(gpu, ModelConfig.from_preset("1.5b"), True))


def test_dry_run_refuses_1_5b_here_and_accepts_tiny(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(memory, "available_memory", lambda device: 18 * GiB)  # this 24 GB machine, 18 GB free
    assert main(["train", "--model", "1.5b", "--steps", "1", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "does NOT fit" in captured.out and "weights, gradients and AdamW state alone need" in captured.err
    assert captured.err.startswith("ratplus train: error: the memory plan needs about")
    argv = ["train", "--model", "tiny", "--steps", "1", "--seq-len", "128", "--dry-run", "--activation-checkpointing"]
    argv += ["all", "--set", "vocab_size=300"]  # the bundled corpus's BPE needs >= 257 ids
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "-> fits" in out and "checkpointing every 1 block(s)" in out
    # the real run refuses before reading data or writing anything
    out_dir = tmp_path / "run"
    assert main(["train", "--model", "1.5b", "--steps", "1", "--out", str(out_dir)]) == 2
    assert "18.00 GiB are available" in capsys.readouterr().err and not out_dir.exists()

"""The Python API checks numbers, types and pattern strings before any work, with a ValueError
naming the field (the CLI shares these checks)."""

import dataclasses
import math

import pytest
import torch

from ratplus import AttentionPattern, ModelConfig, RATPlusLM
from ratplus.config import MAX_PATTERN_SIZE, HeadGroups
from ratplus.io.tokenizer import MAX_BPE_VOCAB, train_bpe
from ratplus.model.cache import RATPlusCache
from ratplus.train.config import TrainConfig

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rope_base": NAN}, "rope_base must be a finite number > 0"),
        ({"rope_base": INF}, "rope_base must be a finite number > 0"),
        ({"rope_base": "big"}, "rope_base must be a finite number > 0"),
        ({"norm_eps": NAN}, "norm_eps must be a finite number > 0"),
        ({"norm_eps": 0.0}, "norm_eps must be a finite number > 0"),
        ({"init_std": -1.0}, "init_std must be a finite number >= 0"),
        ({"init_std": INF}, "init_std must be a finite number >= 0"),
        ({"apply_re": "no"}, "apply_re must be true or false"),
        ({"tie_embeddings": 2}, "tie_embeddings must be true or false"),
        ({"eos_token_id": "1"}, "eos_token_id must be an int or null"),
        ({"d_model": 32.0}, "d_model must be a positive int"),
        ({"bogus": 1}, r"unknown ModelConfig field\(s\): bogus"),
    ],
)
def test_model_config_numbers(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_preset("tiny", **overrides)


def test_model_config_from_a_non_object():
    with pytest.raises(ValueError, match="must be a JSON object of fields, got list"):
        ModelConfig.from_dict([1, 2])


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"lr": NAN}, "lr must be a finite number"),
        ({"lr": INF}, "lr must be a finite number"),
        ({"lr": "1e-3"}, "lr must be a finite number"),
        ({"min_lr": NAN}, "min_lr must be a finite number"),
        ({"warmup": NAN}, "warmup must be a finite number"),
        ({"weight_decay": INF}, "weight_decay must be a finite number"),
        ({"grad_clip": NAN}, "grad_clip must be a finite number"),
        ({"betas": (NAN, 0.9)}, "betas must be two finite numbers"),
        ({"seed": "x"}, "seed must be an int"),
        ({"resume": 3}, "resume must be true, false or a checkpoint path"),
        ({"sparse_pattern": " "}, "sparse_pattern must be a non-empty pattern string"),
        ({"eval_patterns": []}, "eval_patterns must be a non-empty list"),
        ({"eval_patterns": [""]}, "eval_patterns must be a non-empty list"),
        ({"out_dir": ""}, "out_dir must be a non-empty string"),
    ],
)
def test_train_config_numbers(fields, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"steps": 1, **fields}).validate()


def test_train_config_epochs_must_be_finite():
    cfg = TrainConfig(task="sft", epochs=INF, sft_data="x.jsonl", init_from="m", joint_train=False)
    with pytest.raises(ValueError, match="epochs must be a finite number"):
        cfg.validate()
    with pytest.raises(ValueError, match="must be a JSON object of fields"):
        TrainConfig.from_dict(["steps"])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("D١٦", "unknown attention pattern"),  # Arabic-Indic digits: int() would accept them
        ("D²", "unknown attention pattern"),
        ("D4-W١", "unknown field 'W١'"),
        ("topk-B4-K2-quest-moba", "conflicting scorings quest and moba"),
        ("topk-B4-K2-moba-moba", "conflicting scorings"),
        ("", "unknown attention pattern ''"),
        ("   ", "unknown attention pattern"),
        ("D4-", "unknown field ''"),
        ("D" + "9" * 40, "dilation_size=9+ is beyond any context"),
        (f"local-W{MAX_PATTERN_SIZE + 1}", "local_size=.* is beyond any context"),
    ],
)
def test_bad_pattern_strings(text, match):
    with pytest.raises(ValueError, match=match):
        AttentionPattern.parse(text)


def test_pattern_fields_and_head_groups():
    with pytest.raises(ValueError, match="block_size must be an int"):
        AttentionPattern(kind="topk", block_size="4")
    with pytest.raises(ValueError, match="must look like '<pattern>:<num_heads>'"):
        HeadGroups.parse("D4:٢+D4:2")
    cfg = ModelConfig.from_preset("tiny")
    for spec in ("", "D4/"):
        with pytest.raises(ValueError, match=r"unknown attention pattern|num_layers"):
            cfg.resolve_pattern(spec)
    assert (
        AttentionPattern.parse(f"local-W{MAX_PATTERN_SIZE}").local_size == MAX_PATTERN_SIZE
    )  # the bound itself is fine


def test_cache_clamps_windows_to_its_length():
    """A window or prefix far beyond the cache changes no key set: the cache clamps it instead of
    allocating slots for it, and decoding matches the full forward."""
    torch.manual_seed(0)
    model = RATPlusLM(ModelConfig.from_preset("tiny")).eval()
    huge = f"D4-W{MAX_PATTERN_SIZE}-P{MAX_PATTERN_SIZE}"
    cache = RATPlusCache(model.config, batch_size=1, max_len=16, pattern=huge)
    dense = RATPlusCache(model.config, batch_size=1, max_len=16, pattern="dense")
    assert cache.nbytes() <= dense.nbytes() * 1.5  # P + W + 1 <= max_len + 1 slots, plus the few dilated ones
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = model(ids, pattern=huge)
        step = torch.cat(
            [model(ids[:, :8], cache=cache), *(model(ids[:, t : t + 1], cache=cache) for t in range(8, 12))], 1
        )
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_model_forward_checks_token_ids():
    model = RATPlusLM(ModelConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match=r"token id 256 outside \[0, vocab_size=256\)"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="token id -1 outside"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"input_ids must be integer token ids, got torch\.float32"):
        model(torch.tensor([[1.0, 2.0]]))


def test_bpe_vocabulary_that_cannot_fit_memory_is_refused():
    with pytest.raises(ValueError, match=rf"vocab_size must be an int in \[257, {MAX_BPE_VOCAB}\]"):
        train_bpe(["some text"], 10**10)


@pytest.mark.parametrize("word", ["yes", "no", "true", "latest"])
def test_train_config_resume_word_is_not_a_path(word, tmp_path, monkeypatch):
    from ratplus.train.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"resume={word!r} is a word, not a checkpoint path"):
        TrainConfig(resume=word, steps=1).validate()
    (tmp_path / word).mkdir()  # a folder that really has that name is a path
    TrainConfig(resume=word, steps=1).validate()


def test_recall_run_that_diverges_is_an_error_not_zero_accuracy(tmp_path, monkeypatch):
    """A NaN loss stops the probe with FloatingPointError (the CLI's one-line error), instead of
    finishing with every accuracy 0 and exit 0."""
    import ratplus.eval.recall as recall
    import ratplus.eval.recall_train as recall_train

    real = recall_train.optimizer_steps

    def nan_loss(*args, **kwargs):
        losses, norm = real(*args, **kwargs)
        return {k: float("nan") for k in losses}, norm

    monkeypatch.setattr(recall_train, "optimizer_steps", nan_loss)
    cfg = recall.quick_config(steps=3, adapt_steps=0, eval_batches=1, models=("ratplus",), progress=False)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 1 .* lower the learning rate"):
        recall.run_recall_probe(cfg, tmp_path, plot=False)


@pytest.mark.parametrize("text", ["local", "local-P4", "LOCAL"])
def test_local_pattern_needs_its_window(text):
    with pytest.raises(ValueError, match="needs its window: local-W<w>"):
        AttentionPattern.parse(text)


def test_model_refuses_a_list_and_a_size_that_cannot_fit():
    model = RATPlusLM(ModelConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="input_ids must be a \\(B, T\\) tensor of token ids, got list"):
        model([[1, 2, 3], [4]])
    huge = ModelConfig(vocab_size=256, d_model=2**40, num_layers=1, num_heads=2**30, max_seq_len=16)
    with pytest.raises(ValueError, match=r"parameter model .* needs .* GiB, more than the .* GiB available"):
        RATPlusLM(huge)
    with torch.device("meta"):  # nothing is allocated on meta: no check
        assert RATPlusLM(ModelConfig(vocab_size=256, d_model=2**14, num_layers=64, num_heads=128)).num_params() > 2**34


@pytest.mark.parametrize(
    ("prompt", "match"),
    [([[1.7, 2.2]], "holds 1.7 \\(float\\)"), ([[1, True]], "holds True \\(bool\\)"), ("hello", "not text")],
)
def test_generate_refuses_prompts_that_are_not_int_ids(prompt, match):
    from ratplus import generate

    model = RATPlusLM(ModelConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, 2)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"joint_train": False, "train_pattern": "snapkv-C16-O4"}, "is inference-only"),
        ({"joint_train": False, "train_pattern": "topk-B8-K1"}, "is inference-only"),
        ({"sparse_pattern": "Dfoo"}, "unknown attention pattern 'Dfoo'"),
        ({"joint_train": False, "train_pattern": "D8:3+D4:3"}, "covers 6 heads but the layer has num_heads=4"),
        ({"seq_len": 100000}, "seq_len=100000 is above the model's max_seq_len=256"),
        ({"seq_len": 64, "data": "/nonexistent/shards"}, "data folder not found"),
    ],
)
def test_plan_only_runs_the_checks_of_the_run(fields, match, tmp_path):
    """``plan_only`` (--dry-run) is the run stopped before the model: what ``train`` refuses, it
    refuses, and it writes nothing."""
    from ratplus.train.trainer import plan_only, train

    cfg = TrainConfig(model="tiny", steps=1, out_dir=str(tmp_path / "run"), progress=False, **fields)
    for run in (plan_only, train):
        with pytest.raises(ValueError, match=match) if "data" not in fields else pytest.raises(FileNotFoundError):
            run(cfg)
    assert not (tmp_path / "run").exists()
    ok = TrainConfig(model="tiny", steps=1, seq_len=64, out_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="vocab_size must be an int in \\[257"):  # tiny's 256: no BPE of that size
        plan_only(ok, show=lambda _: None)
    plan = plan_only(dataclasses.replace(ok, model_overrides={"vocab_size": 300}), show=lambda _: None)
    assert plan.fits and plan.seq_len == 64 and not (tmp_path / "run").exists()


def test_dry_run_checks_the_starting_weights_against_the_model(tmp_path):
    """adapt from a folder with an override that changes the shapes: the dry run reads the weights'
    names and shapes from the safetensors header and refuses with the run's own message."""
    from ratplus.io.folder import save_pretrained
    from ratplus.train.trainer import adapt

    torch.manual_seed(0)
    save_pretrained(RATPlusLM(ModelConfig.from_preset("tiny", vocab_size=300)), tmp_path / "m")
    args = dict(steps=1, seq_len=64, out_dir=str(tmp_path / "a"), model_overrides={"ffn_mult": 2})
    errors = []
    for dry in (True, False):
        with pytest.raises(ValueError, match=r"model.safetensors does not match the model config: shape") as e:
            adapt(tmp_path / "m", "D4", dry_run=dry, **args)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert adapt(tmp_path / "m", "D4", dry_run=True, steps=1, seq_len=64, out_dir=str(tmp_path / "a")).fits

import pytest

from ratplus import AttentionPattern, HeadGroups, ModelConfig, RATPlusLM
from ratplus.config import PRESETS, pattern_to_str, resolve_pattern


@pytest.mark.parametrize(
    "text, expected",
    [
        ("dense", AttentionPattern()),
        ("D16", AttentionPattern(16, 0, 0)),
        ("D16-W256-P4", AttentionPattern(16, 256, 4)),
        ("d16-p4-w256", AttentionPattern(16, 256, 4)),
        ("local-W64-P4", AttentionPattern(None, 64, 4)),
        (
            "topk-B64-K16-W64-P4-quest",
            AttentionPattern(kind="topk", block_size=64, top_k=16, local_size=64, initial_size=4),
        ),
        ("topk-B32-K4-moba", AttentionPattern(kind="topk", block_size=32, top_k=4, scoring="moba")),
    ],
)
def test_parse(text, expected):
    p = AttentionPattern.parse(text)
    assert p == expected
    assert AttentionPattern.parse(str(p)) == p  # printed form round-trips


def test_print_forms():
    assert str(AttentionPattern()) == "dense"
    assert str(AttentionPattern(dilation_size=16, local_size=0, initial_size=0)) == "D16-W0-P0"
    assert str(AttentionPattern(None, 64, 4)) == "local-W64-P4"


@pytest.mark.parametrize(
    "bad, field",
    [
        ("D0", "dilation_size"),
        ("D16-X4", "unknown field"),
        ("sparse", "unknown attention pattern"),
        ("D16-W4-W5", "given twice"),
        ("topk-B0-K4", "block_size"),
        ("", "unknown attention pattern"),
    ],
)
def test_parse_errors(bad, field):
    with pytest.raises(ValueError, match=field):
        AttentionPattern.parse(bad)


def test_field_errors():
    with pytest.raises(ValueError, match="dilation_size"):
        AttentionPattern(dilation_size=0)
    with pytest.raises(ValueError, match="dilation_size"):
        AttentionPattern(dilation_size=-1)
    with pytest.raises(ValueError, match="local_size"):
        AttentionPattern(16, local_size=-1)
    with pytest.raises(ValueError, match="initial_size"):
        AttentionPattern(16, initial_size=-3)


def test_model_config_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ModelConfig(d_model=100, num_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig(vocab_size=0)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("13b")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"d_model": 64, "bogus": 1})


def test_head_groups_and_layers():
    layers = resolve_pattern("D16:2+local-W8-P1:2", num_layers=3, num_heads=4)
    assert len(layers) == 3 and layers[0].groups == ((AttentionPattern(16), 2), (AttentionPattern(None, 8, 1), 2))
    assert str(layers[0]) == "D16-W0-P0:2+local-W8-P1:2"
    assert HeadGroups.parse(str(layers[0])) == layers[0]
    per_layer = resolve_pattern("dense/D4/D16-W8", num_layers=3, num_heads=4)
    assert [str(layer) for layer in per_layer] == ["dense", "D4-W0-P0", "D16-W8-P0"]
    assert pattern_to_str(per_layer) == "dense/D4-W0-P0/D16-W8-P0"
    with pytest.raises(ValueError, match="num_layers=3"):
        resolve_pattern("dense/D4", num_layers=3, num_heads=4)
    with pytest.raises(ValueError, match="num_layers=3"):
        resolve_pattern(["dense", "D4"], num_layers=3, num_heads=4)
    with pytest.raises(ValueError, match="num_heads=4"):
        resolve_pattern("D16:2+dense:1", num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="head group"):
        resolve_pattern("D16:2+dense", num_layers=1, num_heads=4)


def test_kv_slots_and_keys_per_query():
    p = AttentionPattern(16, 256, 4)
    assert p.kv_slots(4096) == 4 + 256 + 1 + 4096 // 16
    assert AttentionPattern().kv_slots(100) == 101
    # keys_per_query against a brute-force count of the index sets of docs/DESIGN.md section 3
    for pat in [AttentionPattern(4, 3, 5), AttentionPattern(None, 7, 2), AttentionPattern(3), AttentionPattern()]:
        for t in range(60):
            brute = sum(
                1
                for q in range(t + 1)
                if (t - pat.local_size <= q)
                or (q < pat.initial_size)
                or (
                    pat.dilation_size is not None
                    and (q + 1) % pat.dilation_size == 0
                    and q >= pat.initial_size
                    and q < t - pat.local_size
                )
            )
            assert pat.keys_per_query(t) == brute, (pat, t)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("apply_re", [True, False])
def test_preset_param_count_closed_form(name, apply_re):
    cfg = ModelConfig.from_preset(name, apply_re=apply_re)
    C, V, L = cfg.d_model, cfg.vocab_size, cfg.num_layers
    per_layer_c2 = 14 if apply_re else 13  # docs/DESIGN.md section 2
    # GQA: the k, v (and f) blocks of in_proj shrink from C x C to (C / G) x C each
    per_layer_c2 -= (3 if apply_re else 2) * (1 - 1 / cfg.kv_group)
    assert cfg.num_params() == V * C + L * round(per_layer_c2 * C * C + 2 * C) + C
    if name in ("tiny", "demo", "demo-gqa", "125m"):  # cheap enough to instantiate
        assert RATPlusLM(cfg).num_params() == cfg.num_params()


def test_paper_sizes():
    assert abs(ModelConfig.from_preset("1.5b").num_params() / 1e9 - 1.475) < 0.01
    assert abs(ModelConfig.from_preset("2.6b").num_params() / 1e9 - 2.65) < 0.02
    assert abs(ModelConfig.from_preset("7.6b").num_params() / 1e9 - 7.65) < 0.02


def test_config_save_load(tmp_path):
    cfg = ModelConfig.from_preset("tiny", apply_re=False)
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(FileNotFoundError):
        ModelConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.load(tmp_path / "bad.json")


def test_canonical_pattern_names_each_pattern_once_and_rejects_bad_specs():
    cfg = ModelConfig.from_preset("tiny")
    assert cfg.canonical_pattern("D16") == cfg.canonical_pattern("D16-W0-P0") == "D16-W0-P0"
    assert cfg.canonical_pattern("dense") == cfg.canonical_pattern(None) == "dense"
    with pytest.raises(ValueError, match="bad attention pattern 'D0'"):
        cfg.canonical_pattern("D0")


@pytest.mark.parametrize(
    "spec", ["snapkv-C16-O4", "topk-B16-K2", "topk-B16-K2-W8-quest", "D16/snapkv-C16-O4", "D4:2+topk-B8-K2:2"]
)
def test_inference_only_patterns_refused_for_training(spec):
    cfg = ModelConfig.from_preset("tiny")
    with pytest.raises(ValueError, match=r"--pattern .* is inference-only"):
        cfg.training_pattern(spec, "--pattern")


@pytest.mark.parametrize("spec", [None, "dense", "D16", "D16-W64-P4", "local-W16-P1", "D4:2+local-W8:2", "dense/D8"])
def test_trainable_patterns_pass(spec):
    cfg = ModelConfig.from_preset("tiny")
    assert cfg.training_pattern(spec) == cfg.canonical_pattern(spec)

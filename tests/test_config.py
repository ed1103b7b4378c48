import pytest

from unifusion.config import (
    ConfigError,
    DiTConfig,
    UniFusionConfig,
    VLMIdentity,
    default_layer_selection,
    make_config,
    paper_preset,
    tiny_preset,
)


def test_default_selection_matches_paper_for_32_layers():
    assert default_layer_selection(32) == (4, 7, 10, 13, 16, 19, 22, 25, 28, 31)
    assert len(default_layer_selection(32)) == 10


def test_default_selection_other_strides_and_tiny_models():
    assert default_layer_selection(8) == (4, 7)
    assert default_layer_selection(28, every=4) == (5, 9, 13, 17, 21, 25)
    assert default_layer_selection(2) == (1,)  # fewer layers than the stride: the middle layer


def test_config_json_round_trip():
    cfg = tiny_preset()
    again = UniFusionConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.vlm.selected_layers == (4, 7)


def test_inconsistent_configs_are_refused_with_the_reason():
    vlm = VLMIdentity("X", 8, 64, (4, 7))
    with pytest.raises(ConfigError, match="outside 0..8"):
        VLMIdentity("X", 8, 64, (4, 9))
    with pytest.raises(ConfigError, match="not divisible"):
        DiTConfig(hidden_size=65, num_heads=4)
    with pytest.raises(ConfigError, match="sum to the head dim"):
        DiTConfig(hidden_size=64, num_heads=4, rope_axes=(4, 4, 4))
    good = make_config(vlm, DiTConfig(hidden_size=64, num_heads=4, rope_axes=(4, 6, 6)), lap_heads=4)
    with pytest.raises(ConfigError, match="LAP expects"):
        UniFusionConfig(VLMIdentity("X", 8, 64, (4,)), good.lap, good.dit)


def test_damaged_json_names_the_problem():
    with pytest.raises(ConfigError, match="damaged"):
        UniFusionConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="newer version"):
        raw = tiny_preset().to_json().replace('"depth"', '"depth_v2": 1, "depth"')
        UniFusionConfig.from_json(raw)


def test_identity_mismatch_lists_fields():
    a = VLMIdentity("InternVLForConditionalGeneration", 32, 4096, (4, 7))
    b = VLMIdentity("Qwen2_5_VLForConditionalGeneration", 28, 3584, (4, 7))
    problems = a.mismatches(b)
    assert len(problems) == 3 and "expected 32, found 28" in problems[1]
    assert a.mismatches(a) == []


def test_paper_preset_shape():
    cfg = paper_preset()
    assert cfg.vlm.selected_layers == (4, 7, 10, 13, 16, 19, 22, 25, 28, 31)
    assert cfg.dit.in_channels == 16 and cfg.lap.out_dim == cfg.dit.hidden_size

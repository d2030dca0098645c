"""RouterConfig: seed knob names, JSON round trip, clear rejections."""

from __future__ import annotations

import pytest

from routertune import GRANULARITIES, RouterConfig, RouterConfigError


def test_defaults_match_the_seed():
    cfg = RouterConfig()
    assert (cfg.granularity, cfg.router_layers, cfg.threshold, cfg.gradient_scale) == (
        "attn_sequence",
        16,
        0.5,
        0.0,
    )
    assert cfg.target_capacity is None and cfg.layers is None


def test_seed_default_layers_on_a_32_layer_model():
    assert RouterConfig().routed_layer_indices(32) == list(range(15, 31))


def test_router_layers_is_capped_and_skips_layer_zero_and_last():
    assert RouterConfig(router_layers=100).routed_layer_indices(6) == [1, 2, 3, 4]
    assert RouterConfig(router_layers=0).routed_layer_indices(6) == []


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_json_round_trip(granularity):
    cfg = RouterConfig(
        granularity=granularity,
        router_layers=3,
        threshold=0.4,
        target_capacity=0.6,
        gradient_scale=0.1,
        layers=[3, 1],
        layer_thresholds={2: 0.7},
    )
    back = RouterConfig.from_json(cfg.to_json())
    assert back == cfg and back.layers == [1, 3] and back.layer_thresholds == {2: 0.7}


@pytest.mark.parametrize("alias", ["mod_n", "mindskip_n"])
def test_seed_aliases(alias):
    assert RouterConfig.from_dict({alias: 8}).router_layers == 8
    with pytest.raises(RouterConfigError, match="disagree"):
        RouterConfig.from_dict({alias: 8, "router_layers": 4})


def test_unknown_keys_warn():
    with pytest.warns(UserWarning, match="unknown keys"):
        RouterConfig.from_dict({"granularity": "attn_token", "colour": "blue"})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"granularity": "attention"}, "granularity must be one of"),
        ({"router_layers": -1}, "router_layers must be >= 0"),
        ({"router_layers": 2.5}, "router_layers must be an integer"),
        ({"threshold": float("nan")}, "threshold must be finite"),
        ({"threshold": -0.1}, "threshold must be >= 0"),
        ({"threshold": "high"}, "threshold must be a number"),
        ({"target_capacity": 1.5}, r"target_capacity must be in \[0, 1\]"),
        ({"gradient_scale": -1}, "gradient_scale must be >= 0"),
        ({"gradient_scale": 0.5}, "needs a target_capacity"),
        ({"layers": [1, 1]}, "duplicates"),
        ({"layers": [0, 3]}, "layer 0 is never routed"),
        ({"layers": ["a"]}, "list of integers"),
        ({"layer_thresholds": {1: -2}}, "layer_thresholds must be >= 0"),
    ],
)
def test_invalid_values_are_rejected_clearly(kwargs, message):
    with pytest.raises(RouterConfigError, match=message):
        RouterConfig(**kwargs)


def test_layers_beyond_the_model_are_rejected():
    with pytest.raises(RouterConfigError, match=r"layers \[7\] do not exist"):
        RouterConfig(layers=[2, 7]).routed_layer_indices(6)


def test_invalid_json():
    with pytest.raises(RouterConfigError, match="not valid JSON"):
        RouterConfig.from_json("{")
    with pytest.raises(RouterConfigError, match="must be an object"):
        RouterConfig.from_json("[1]")

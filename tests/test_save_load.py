"""Router files: routers only, round trip, and loud failures on anything that does not match."""

from __future__ import annotations

import json

import pytest
import torch

from routertune import RouterConfig, RouterLoadError, attach_routers, load_routers, save_routers
from routertune.routing.attach import get_router_config, routed_layers, set_thresholds
from routertune.routing.router_files import CONFIG_NAME, WEIGHTS_NAME

from helpers import VOCAB, randomize_routers, tiny_model


def saved(tmp_path, arch="llama", granularity="attn_sequence", seed=0):
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    randomize_routers(model, seed=seed)
    save_routers(model, tmp_path)
    return model


def test_round_trip_restores_decisions(tmp_path, arch):
    model = saved(tmp_path, arch, "attn_token")
    set_thresholds(model, {1: 0.3})
    save_routers(model, tmp_path)
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    fresh = tiny_model(arch)
    load_routers(fresh, tmp_path)
    assert get_router_config(fresh).granularity == "attn_token"
    assert routed_layers(fresh)[1].router.threshold == 0.3
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def test_files_hold_routers_only(tmp_path):
    model = saved(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(tensors) == {"layers.1.weight", "layers.2.weight"}
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < 4096
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["hidden_size"] == 64 and meta["num_hidden_layers"] == 4
    assert meta["router_config"]["granularity"] == "attn_sequence"
    assert meta["routed_layers"] == [1, 2]
    assert "routertune_version" in meta and "base_model" in meta
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    del model


def test_load_into_model_of_other_shape_fails(tmp_path):
    saved(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=VOCAB
        )
    )
    with pytest.raises(RouterLoadError, match="hidden_size=64"):
        load_routers(other, tmp_path)
    deeper = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, vocab_size=VOCAB
        )
    )
    with pytest.raises(RouterLoadError, match="4 layers"):
        load_routers(deeper, tmp_path)


def test_granularity_mismatch_fails(tmp_path):
    saved(tmp_path, granularity="mlp_token")
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(granularity="attn_sequence", router_layers=2))
    with pytest.raises(RouterLoadError, match="granularity mlp_token"):
        load_routers(model, tmp_path)


def test_missing_folder_and_files(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(RouterLoadError, match="does not exist"):
        load_routers(model, tmp_path / "nope")
    (tmp_path / CONFIG_NAME).write_text("{}")
    with pytest.raises(RouterLoadError, match=WEIGHTS_NAME):
        load_routers(model, tmp_path)


def test_corrupt_weights_are_an_error_not_a_zero_router(tmp_path):
    saved(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(RouterLoadError, match="corrupt"):
        load_routers(tiny_model("llama"), tmp_path)


def test_corrupt_config_is_an_error(tmp_path):
    saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(RouterLoadError, match="not valid JSON"):
        load_routers(tiny_model("llama"), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"router_config": {}}))
    with pytest.raises(RouterLoadError, match="lacks"):
        load_routers(tiny_model("llama"), tmp_path)


def test_non_finite_weights_are_rejected(tmp_path):
    model = saved(tmp_path)
    with torch.no_grad():
        routed_layers(model)[1].router.proj.weight[0, 0] = float("nan")
    save_routers(model, tmp_path)
    with pytest.raises(RouterLoadError, match="non-finite"):
        load_routers(tiny_model("llama"), tmp_path)


def test_failed_save_keeps_previous_files(tmp_path, monkeypatch):
    saved(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(router_layers=2))

    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_routers(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

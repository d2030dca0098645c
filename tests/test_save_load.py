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


# ---- a LoRA adapter trained with the routers ------------------------------------------------
def saved_with_lora(tmp_path, granularity="attn_sequence"):
    """Routers + a LoRA adapter with random (non-zero) B on every projection, routed sub-layers
    included, saved as training saves them. Returns the trained (PEFT) model."""
    from peft import LoraConfig, get_peft_model

    from routertune.training.trainer import rename_to_plain_names

    model = tiny_model("llama")
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    randomize_routers(model, seed=4)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                      exclude_modules=r".*\.router\.proj", init_lora_weights=False)  # fmt: skip
    torch.manual_seed(5)
    peft_model = get_peft_model(model, lora).eval()
    adapter = {n: p.detach() for n, p in peft_model.named_parameters() if "lora_" in n}
    peft_model.save_pretrained(str(tmp_path), state_dict=adapter)
    rename_to_plain_names(model, tmp_path / "adapter_model.safetensors")
    save_routers(model, tmp_path)
    return peft_model


@pytest.mark.parametrize("granularity", ["attn_sequence", "mlp_token"])
def test_lora_adapter_is_merged_before_the_routers_attach(tmp_path, granularity):
    from safetensors.torch import load_file

    trained = saved_with_lora(tmp_path, granularity)
    names = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    # the routed layers' sub-layers have their LoRA in the file, under the plain names
    assert {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight" for i in (1, 2)} <= names
    assert not any("base_layer" in n for n in names)
    ids = torch.randint(3, VOCAB, (2, 9))
    fresh = tiny_model("llama")
    with torch.no_grad():
        plain = fresh(ids).logits
        expected = trained(input_ids=ids).logits
    load_routers(fresh, tmp_path)
    assert get_router_config(fresh).granularity == granularity
    assert all(type(m).__name__ == "Linear" for n, m in fresh.named_modules() if n.endswith("q_proj"))
    with torch.no_grad():
        got = fresh(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the adapter matters, so leaving it out would show


def test_lora_adapter_mismatch_and_routed_model_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    saved_with_lora(tmp_path)
    routed = tiny_model("llama")
    attach_routers(routed, RouterConfig(router_layers=2))
    with pytest.raises(RouterLoadError, match="holds a LoRA adapter trained with its routers"):
        load_routers(routed, tmp_path)
    load_routers(routed, tmp_path, merge_adapter=False)  # the caller applied it
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    dropped = next(k for k in tensors if ".layers.1.self_attn.q_proj.lora_B" in k)
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights))
    fresh = tiny_model("llama")
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    with pytest.raises(RouterLoadError, match="does not match the model: 0 tensors without a module.*1 modules"):
        load_routers(fresh, tmp_path)
    assert get_router_config(fresh) is None  # nothing attached, weights untouched
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())
    assert all(type(m).__name__ == "Linear" for n, m in fresh.named_modules() if n.endswith("q_proj"))


def test_copy_adapter_carries_the_lora_to_another_router_folder(tmp_path):
    from routertune.routing.router_files import copy_adapter

    source = tmp_path / "trained"
    saved_with_lora(source)
    assert copy_adapter(source, source)  # the same folder: nothing to copy
    assert not copy_adapter(tmp_path / "elsewhere", tmp_path / "out")  # no adapter there
    assert copy_adapter(source, tmp_path / "out")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes()

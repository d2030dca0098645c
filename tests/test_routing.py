"""Routed forward passes: exactness, real skipping, padding, training gradients."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from routertune import GRANULARITIES, RouterConfig, attach_routers, detach_routers
from routertune.routing.attach import (
    all_units_kept,
    capacity_regularizer,
    get_router_config,
    routed_layers,
    router_parameters,
    set_thresholds,
)
from routertune.routing.config import RouterConfigError
from routertune.routing.observe import track_capacity

from helpers import VOCAB, left_padded_batch, randomize_routers, tiny_model, without_sublayers


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_threshold_zero_is_exactly_the_plain_model(arch, granularity):
    model = tiny_model(arch)
    ids = torch.randint(3, VOCAB, (3, 12))
    with torch.no_grad():
        ref = model(ids).logits
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2, threshold=0.0))
    randomize_routers(model)  # scores no longer 0.5, yet threshold 0 keeps all
    with torch.no_grad():
        out = model(ids).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_skip_all_equals_model_without_those_sublayers(arch, granularity):
    model = tiny_model(arch)
    cfg = RouterConfig(granularity=granularity, router_layers=2, threshold=1.5)
    ref = without_sublayers(model, cfg.routed_layer_indices(4), cfg.target)
    ids = torch.randint(3, VOCAB, (2, 14))
    attach_routers(model, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_skipped_units_are_not_computed(granularity):
    model = tiny_model("llama")
    cfg = RouterConfig(granularity=granularity, router_layers=2, threshold=1.5)
    attach_routers(model, cfg)
    calls = []
    for i in cfg.routed_layer_indices(4):
        layer = model.model.layers[i]
        for part in ("self_attn", "mlp"):
            module = getattr(layer, part)  # the model's own module, inside routertune's wrapper if any
            getattr(module, "base_layer", module).register_forward_hook(
                lambda m, a, o, i=i, part=part: calls.append((i, part))
            )
        for proj in ("q_proj", "o_proj"):
            getattr(layer.self_attn, proj).register_forward_hook(
                lambda m, a, o, i=i, p=proj: calls.append((i, p))
            )
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (2, 9)))
    target = cfg.target
    called_parts = {p for _, p in calls}
    if target in ("attn", "block"):
        assert not {"self_attn", "q_proj", "o_proj"} & called_parts
    if target in ("mlp", "block"):
        assert "mlp" not in called_parts
    if target == "attn":
        assert "mlp" in called_parts


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_mixed_decisions_match_gated_dense_computation(arch, granularity):
    """Real skipping (eval) == computing everything and applying the hard 0/1 gate (train)."""
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=3))
    randomize_routers(model, seed=1)
    ids, mask, _ = left_padded_batch([12, 9, 12, 5], seed=2)
    with torch.no_grad(), track_capacity(model) as stats:
        skipped = model(ids, attention_mask=mask).logits
    overall = stats.overall
    assert 0.0 < overall < 1.0, f"test needs mixed decisions, got capacity {overall}"
    model.train()
    dense = model(ids, attention_mask=mask).logits.detach()
    valid = mask.bool()
    torch.testing.assert_close(skipped[valid], dense[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_left_padded_batch_equals_each_sequence_alone(arch, granularity):
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=3))
    randomize_routers(model, seed=3)
    ids, mask, seqs = left_padded_batch([11, 7, 11, 4], seed=4)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for b, seq in enumerate(seqs):
            alone = model(seq.unsqueeze(0)).logits[0]
            torch.testing.assert_close(batched[b, -len(seq) :], alone, rtol=1e-4, atol=1e-4)


def test_sequence_route_ignores_padding():
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(granularity="attn_sequence", router_layers=2))
    randomize_routers(model, seed=5)
    ids, mask, seqs = left_padded_batch([10, 3], seed=6)
    recs = []
    from routertune.routing.observe import router_probabilities

    with torch.no_grad(), router_probabilities(model) as rec:
        model(ids, attention_mask=mask)
        model(seqs[1].unsqueeze(0))
    recs = rec.per_layer()
    for scores in recs.values():
        # the padded row's score equals the score of the same sequence alone
        torch.testing.assert_close(scores[1], scores[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_router_only_gradients_through_straight_through_estimator(arch, granularity):
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    for p in model.parameters():
        p.requires_grad_(False)
    routers = router_parameters(model)
    assert len(routers) == 2 and all(p.shape == (1, 64) for p in routers)
    for p in routers:
        p.requires_grad_(True)
    model.train()
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        model.eval()
        ref = model(ids).logits
        model.train()
    out = model(ids, labels=ids)
    # forward value of the gate is exactly the hard decision (all kept at init)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    for p in routers:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    router_ids = {id(p) for p in routers}
    assert all(p.grad is None for p in model.parameters() if id(p) not in router_ids)


def test_skipped_unit_still_gets_router_gradient_in_training():
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(granularity="attn_sequence", router_layers=2, threshold=0.6))
    model.train()
    out = model(torch.randint(3, VOCAB, (2, 8)), labels=torch.randint(3, VOCAB, (2, 8)))
    out.loss.backward()
    for p in router_parameters(model):
        assert p.grad.abs().sum() > 0


def test_capacity_regularizer_pushes_capacity_down():
    model = tiny_model("llama")
    cfg = RouterConfig(granularity="attn_token", router_layers=2, target_capacity=0.2, gradient_scale=1.0)
    attach_routers(model, cfg)
    model.train()
    model(torch.randint(3, VOCAB, (2, 8)))
    reg = capacity_regularizer(model)
    assert reg is not None
    assert reg.item() == pytest.approx(2 * (1.0 - 0.2))  # two layers, everything kept at init
    reg.backward()
    for p in router_parameters(model):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_capacity_regularizer_off_by_default():
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(router_layers=2))
    model.train()
    model(torch.randint(3, VOCAB, (1, 5)))
    assert capacity_regularizer(model) is None


def test_gradient_checkpointing_keeps_router_gradients():
    ids = torch.randint(3, VOCAB, (2, 10))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        attach_routers(model, RouterConfig(granularity="attn_sequence", router_layers=2))
        randomize_routers(model, seed=7, scale=0.05)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in router_parameters(model):
            p.requires_grad_(True)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in router_parameters(model)]))
    torch.testing.assert_close(grads[0], grads[1])


def test_layer_zero_and_last_layer_are_never_routed():
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(router_layers=10))
    assert sorted(routed_layers(model)) == [1, 2]
    detach_routers(model)
    with pytest.raises(ValueError, match="layers must be > 0"):
        RouterConfig(layers=[0, 2])


def test_detach_restores_plain_model():
    model = tiny_model("qwen2")
    ids = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad():
        ref = model(ids).logits
    attach_routers(model, RouterConfig(router_layers=2, threshold=2.0))
    detach_routers(model)
    assert all(type(layer).__name__ == "Qwen2DecoderLayer" for layer in model.model.layers)
    assert not any("router" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_attach_twice_is_an_error():
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(router_layers=1))
    with pytest.raises(ValueError, match="already has routers"):
        attach_routers(model, RouterConfig(router_layers=1))


def test_unsupported_architecture_names_the_layer_class():
    from transformers import BloomConfig, BloomForCausalLM, MambaConfig, MambaForCausalLM

    from routertune import UnsupportedArchitectureError

    # no attention sub-module at all
    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=4, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="MambaBlock"):
        attach_routers(model, RouterConfig(router_layers=2))
    # found by name, refused by the attach-time probe: ALiBi biases are laid out per (batch x head),
    # so the kept rows of a mixed batch cannot be sliced out; the model is left as it was
    model = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=4, n_head=2, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        ref = model(ids).logits
    with pytest.raises(UnsupportedArchitectureError, match="BloomBlock .*a mixed decision"):
        attach_routers(model, RouterConfig(router_layers=2))
    assert get_router_config(model) is None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_weights_not_in_the_process_attach_without_probe_for_table_families_only():
    """A model built on the meta device (as big models are before their weights load, or
    partitioned by ZeRO-3 at load) cannot run the probe: a family of the table is attached
    without it, on its layers' device; another family is refused by name and left as it was."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from routertune import UnsupportedArchitectureError
    from routertune.routing.attach import weights_materialized

    with torch.device("meta"):
        model = tiny_model("llama")
    assert not weights_materialized(model)
    attach_routers(model, RouterConfig(router_layers=2))
    assert sorted(routed_layers(model)) == [1, 2]
    assert all(p.is_meta for p in router_parameters(model))
    with pytest.raises(UnsupportedArchitectureError, match="needs the model's weights"):
        detach_routers(model)
        attach_routers(model, RouterConfig(router_layers=2), probe=True)
    with torch.device("meta"):
        other = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2Block .*not in routertune's family table"):
        attach_routers(other, RouterConfig(router_layers=2))
    assert get_router_config(other) is None
    assert weights_materialized(tiny_model("llama"))


def test_generic_layer_with_the_four_parts_is_routed():
    """A Llama-shaped model of an unknown model_type is handled by the generic path."""
    model = tiny_model("llama")
    model.config.model_type = "my_llama_clone"
    ids = torch.randint(3, VOCAB, (2, 9))
    ref = without_sublayers(model, [1, 2], "attn")
    attach_routers(model, RouterConfig(granularity="attn_token", router_layers=2, threshold=1.5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_eager_attention_kept_queries_match_dense():
    model = tiny_model("llama", attn_implementation="eager")
    attach_routers(model, RouterConfig(granularity="attn_token", router_layers=2))
    randomize_routers(model, seed=8)
    ids, mask, _ = left_padded_batch([10, 6], seed=9)
    with torch.no_grad():
        skipped = model(ids, attention_mask=mask).logits
    model.train()
    dense = model(ids, attention_mask=mask).logits.detach()
    torch.testing.assert_close(skipped[mask.bool()], dense[mask.bool()], rtol=1e-4, atol=1e-4)


def test_set_thresholds_validates_layers():
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(router_layers=2))
    set_thresholds(model, {1: 0.7})
    assert routed_layers(model)[1].router.threshold == 0.7
    assert routed_layers(model)[2].router.threshold == 0.5
    with pytest.raises(ValueError, match="have no router"):
        set_thresholds(model, {3: 0.2})


def test_all_units_kept_is_the_dense_model_and_restores_thresholds():
    from routertune.routing.attach import all_units_kept

    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits
    attach_routers(model, RouterConfig(router_layers=2, threshold=1.5))
    with torch.no_grad(), all_units_kept(model):
        assert torch.equal(model(ids).logits, ref)
    assert all(layer.router.threshold == 1.5 for layer in routed_layers(model).values())


@pytest.mark.parametrize("granularity", ["attn_sequence", "block_sequence"])
def test_forced_routes_skip_each_rows_units_as_that_row_alone(arch, granularity):
    """Per-row forced routes (the headroom oracle's) = each row run alone with its layers skipped."""
    from routertune.routing.attach import forced_routes

    model = tiny_model(arch)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2, threshold=0.0))
    layers = sorted(routed_layers(model))
    ids, mask, _ = left_padded_batch([9, 6, 7])
    keep = {layers[0]: torch.tensor([True, False, False]), layers[1]: torch.tensor([False, True, False])}
    with torch.no_grad(), forced_routes(model, keep):
        got = model(input_ids=ids, attention_mask=mask).logits
    for row in range(3):
        alone = ids[row : row + 1, -int(mask[row].sum()) :]
        set_thresholds(model, {i: 0.0 if keep[i][row] else 2.0 for i in layers})
        with torch.no_grad():
            want = model(input_ids=alone).logits
        torch.testing.assert_close(got[row, -alone.shape[1] :], want[0], rtol=1e-4, atol=1e-4)
    set_thresholds(model, 0.0)
    assert all(layer.routing.forced_keep is None for layer in routed_layers(model).values())
    with pytest.raises(RouterConfigError, match="no router"):
        with forced_routes(model, {0: torch.ones(3, dtype=torch.bool)}):
            pass
    with pytest.raises(RouterConfigError, match="bool tensor of shape"):
        with forced_routes(model, {layers[0]: torch.ones(3, 4, dtype=torch.bool)}):
            pass


@pytest.mark.parametrize("granularity", ["attn_token", "attn_sequence", "block_token"])
def test_qwen3_with_qk_norms(granularity):
    """Qwen3 normalises queries and keys per head: the kept-query path must apply those norms."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=VOCAB,
            pad_token_id=0,
        )
    ).eval()
    ids, mask, _ = left_padded_batch([10, 7, 10], seed=21)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    randomize_routers(model, seed=22)
    with torch.no_grad(), all_units_kept(model):
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
    with torch.no_grad(), track_capacity(model) as stats:
        skipped = model(ids, attention_mask=mask).logits
    assert 0.0 < stats.overall < 1.0
    model.train()
    dense = model(ids, attention_mask=mask).logits.detach()
    valid = mask.bool()
    torch.testing.assert_close(skipped[valid], dense[valid], rtol=1e-4, atol=1e-4)


def test_routing_mask_decides_sequences_on_the_chosen_tokens():
    """routing_mask: sequence routers average over the masked tokens only (padding excluded);
    an all-ones mask changes nothing; a row that selects nothing falls back to all its tokens."""
    from routertune.routing.observe import router_probabilities

    model = tiny_model("llama")
    attach_routers(model, RouterConfig(granularity="attn_sequence", router_layers=2))
    randomize_routers(model, seed=3)
    ids, mask, seqs = left_padded_batch([9, 6], seed=4)
    prefix = 4
    routing = torch.zeros_like(mask)
    routing[0, -9 : -9 + prefix] = 1  # row 0: its first 4 real tokens
    with torch.no_grad(), router_probabilities(model) as rec:
        model(ids, attention_mask=mask, routing_mask=routing)  # row 1 selects nothing: all its tokens
        model(seqs[0][:prefix].unsqueeze(0))
        model(seqs[1].unsqueeze(0))
    for scores in rec.per_layer().values():
        torch.testing.assert_close(scores[0], scores[2], rtol=1e-5, atol=1e-6)  # the prefix alone
        torch.testing.assert_close(scores[1], scores[3], rtol=1e-5, atol=1e-6)  # fallback
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        ones = model(ids, attention_mask=mask, routing_mask=torch.ones_like(mask)).logits
    torch.testing.assert_close(plain, ones, rtol=0, atol=0)
    with pytest.raises(ValueError, match="routing_mask must be a 2-D"):
        model(ids, attention_mask=mask, routing_mask=torch.ones(9))


@contextlib.contextmanager
def host_reads():
    """Counts the calls that read a tensor back to the host (a device sync on a GPU)."""
    counts = {"n": 0}
    names = ["tolist", "item", "__int__", "__bool__", "__float__", "nonzero"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name):
        def method(self, *args, **kwargs):
            counts["n"] += 1
            return saved[name](self, *args, **kwargs)

        return method

    for n in names:
        setattr(torch.Tensor, n, counting(n))
    try:
        yield counts
    finally:
        for n in names:
            setattr(torch.Tensor, n, saved[n])


def _prefill_and_decode(model, ids, mask):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        model(step, attention_mask=torch.cat([mask, torch.ones_like(step)], 1), cache=cache, use_cache=True)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_thresholds_that_fix_the_decision_add_no_host_read(granularity):
    """Threshold 0 (keep all) and above 1 (skip all) decide on the host: a routed prefill and
    decode step read back exactly as many tensors as the plain model's; a scored threshold adds
    reads (the decisions' counts), which this check would see."""
    plain = tiny_model("llama")
    ids, mask, _ = left_padded_batch([5, 9, 7], seed=16)
    with host_reads() as base:
        _prefill_and_decode(plain, ids, mask)
    counts = {}
    for threshold in (0.0, 2.0, 0.5):
        model = copy.deepcopy(plain)
        attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
        set_thresholds(model, threshold)
        with host_reads() as reads:
            _prefill_and_decode(model, ids, mask)
        counts[threshold] = reads["n"]
    assert counts[0.0] == counts[2.0] == base["n"]
    assert counts[0.5] > base["n"]

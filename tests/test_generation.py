"""generate() with routers: routes decided at prefill, consistent KV cache, real savings."""

from __future__ import annotations

import pytest
import torch

import routertune.routing.routes as routes_module
from routertune import GRANULARITIES, RouterConfig, attach_routers
from routertune.kv_cache import kv_cache_bytes, kv_cache_layer_lengths
from routertune.routing.attach import routed_layers, set_thresholds
from routertune.routing.layers import ROUTES_ATTR

from helpers import (
    VOCAB,
    greedy,
    left_padded_batch,
    mixed_rows_model,
    randomize_routers,
    tiny_model,
    without_sublayers,
)


def fixed_routes(model, skip_layers):
    """Thresholds that fix every decision: skip ``skip_layers``, keep the other routed layers."""
    set_thresholds(model, {i: (1.5 if i in skip_layers else 0.0) for i in routed_layers(model)})


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cached_generate_equals_uncached_forward_under_same_routes(arch, granularity):
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    if granularity.endswith("token"):
        randomize_routers(model, seed=11)  # token decisions are causal: same with or without cache
    else:
        fixed_routes(model, skip_layers={2})
    ids = torch.randint(3, VOCAB, (1, 9))
    out = greedy(model, ids, n=8)
    seq = out.sequences
    with torch.no_grad():
        full = model(seq, use_cache=False).logits  # (1, T, V), no cache at all
    steps = torch.stack(out.logits, dim=1)  # (1, n, V)
    torch.testing.assert_close(steps, full[:, ids.shape[1] - 1 : -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_generate_matches_model_without_skipped_sublayers(arch, granularity):
    model = tiny_model(arch)
    cfg = RouterConfig(granularity=granularity, router_layers=2)
    ref = without_sublayers(model, [2], cfg.target)
    attach_routers(model, cfg)
    fixed_routes(model, skip_layers={2})
    ids, mask, _ = left_padded_batch([9, 6], seed=12)
    a = greedy(model, ids, mask, n=7).sequences
    b = greedy(ref, ids, mask, n=7).sequences
    assert torch.equal(a, b)
    # sampling with the same seed draws the same tokens
    torch.manual_seed(0)
    s1 = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(0)
    s2 = ref.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=True, top_k=20, pad_token_id=0)
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("granularity", ["attn_sequence", "block_sequence", "attn_token"])
def test_beam_search_matches_model_without_skipped_sublayers(granularity):
    model = tiny_model("llama")
    cfg = RouterConfig(granularity=granularity, router_layers=2)
    ref = without_sublayers(model, [1], cfg.target)
    attach_routers(model, cfg)
    fixed_routes(model, skip_layers={1})
    ids, mask, _ = left_padded_batch([8, 5], seed=13)
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.parametrize("granularity", ["attn_sequence", "mlp_sequence", "block_sequence"])
def test_batched_generation_with_mixed_rows_equals_each_alone(arch, granularity):
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=3))
    randomize_routers(model, seed=14)
    ids, mask, seqs = left_padded_batch([9, 6, 9, 4], seed=15)
    batched = greedy(model, ids, mask, n=6)
    routes = batched.past_key_values.__dict__[ROUTES_ATTR]
    kept = torch.stack([r.keep for r in routes.values()])
    assert kept.any() and not kept.all(), "test needs a mix of kept and skipped rows"
    for b, seq in enumerate(seqs):
        alone = greedy(model, seq.unsqueeze(0), n=6).sequences[0, len(seq) :]
        assert torch.equal(batched.sequences[b, ids.shape[1] :], alone)


def test_layer_skipped_by_whole_batch_stores_no_kv(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, VOCAB, (2, 10))
    dense = greedy(model, ids, n=5).past_key_values
    attach_routers(model, RouterConfig(granularity="attn_sequence", router_layers=2))
    fixed_routes(model, skip_layers={1, 2})
    routed = greedy(model, ids, n=5).past_key_values
    lengths = kv_cache_layer_lengths(routed)
    assert lengths[1] == lengths[2] == 0 and lengths[0] > 0 and lengths[3] > 0
    assert kv_cache_bytes(routed) * 2 == kv_cache_bytes(dense)


@pytest.mark.parametrize("granularity", ["attn_sequence", "block_sequence"])
def test_beam_search_over_compact_layers_equals_the_zero_row_cache(granularity, monkeypatch):
    """Beam search reorders the cache's rows every step; a compact layer must move its own rows
    (not the batch's) with them."""
    ids, mask, _ = left_padded_batch([8, 5, 8], seed=13)
    model = mixed_rows_model("llama", granularity, ids, mask, seed=9)
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=3,
              do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)  # fmt: skip
    got = model.generate(ids, **kw)
    routes = got.past_key_values.__dict__[ROUTES_ATTR]
    assert any(0 < int(r.keep.sum()) < r.keep.numel() for r in routes.values()), "needs mixed rows"
    monkeypatch.setattr(routes_module, "COMPACT_LAYER_CLASSES", {})
    want = model.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5, atol=1e-5)


def test_a_compact_layer_refuses_a_batch_it_does_not_hold():
    """Rows removed from the cache's layers behind routertune's back (not through the cache's
    batch operations, which carry the routes along) are refused by name, not attended wrongly."""
    from transformers import DynamicCache

    ids, mask, _ = left_padded_batch([9, 6, 9], seed=10)
    model = mixed_rows_model("llama", "attn_sequence", ids, mask, seed=9)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        token = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    assert any(isinstance(layer, routes_module.CompactRows) for layer in cache.layers)
    keep = torch.tensor([0, 2])
    for layer in cache.layers:
        layer.batch_select_indices(keep)
    step_mask = torch.cat([mask[keep], torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    with pytest.raises(RuntimeError, match="compact KV cache holds rows of a batch of 2, the forward has 3"):
        with torch.no_grad():
            model(token[keep], attention_mask=step_mask, cache=cache, use_cache=True)


def test_routes_are_decided_at_prefill_and_reused():
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(granularity="attn_sequence", router_layers=2))
    randomize_routers(model, seed=16)
    calls = []
    for layer in routed_layers(model).values():
        layer.router.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    greedy(model, torch.randint(3, VOCAB, (1, 7)), n=6)
    assert len(calls) == 2  # once per routed layer, at prefill only


def test_two_generate_calls_do_not_leak_routes():
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(granularity="attn_sequence", router_layers=3))
    randomize_routers(model, seed=17)
    a = torch.randint(3, VOCAB, (1, 8))
    b = torch.randint(3, VOCAB, (1, 5))
    b_first = greedy(model, b, n=6).sequences
    greedy(model, a, n=6)
    b_again = greedy(model, b, n=6).sequences
    assert torch.equal(b_first, b_again)


def test_kv_cache_bytes_of_none_is_zero():
    assert kv_cache_bytes(None) == 0


@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
@pytest.mark.parametrize("granularity", ["attn_sequence", "block_sequence"])
def test_a_reset_cache_routes_the_next_request_anew(arch, cache_kind, granularity):
    """transformers' recipe reuses one cache across requests with ``cache.reset()``: the next
    request is routed on its own prompt (not with the routes stored for the previous one), and
    layers made compact for the previous request's rows are plain again."""
    from transformers import DynamicCache, StaticCache

    from routertune.routing.routes import CompactRows

    ids, mask, _ = left_padded_batch([10, 7, 10, 6], seed=4)
    model = mixed_rows_model(arch, granularity, ids, mask)
    other_ids, other_mask = ids.flip(0), mask.flip(0)  # same prompts in another order: other routes per row

    def new_cache():
        return StaticCache(config=model.config, max_cache_len=24) if cache_kind == "static" else DynamicCache()

    cache = new_cache()
    greedy(model, ids, mask, n=4, past_key_values=cache)
    assert any(0 < int(r.keep.sum()) < 4 for r in getattr(cache, ROUTES_ATTR).values())
    cache.reset()
    assert not getattr(cache, ROUTES_ATTR)
    assert not any(isinstance(layer, CompactRows) for layer in cache.layers)
    reused = greedy(model, other_ids, other_mask, n=4, past_key_values=cache)
    fresh = greedy(model, other_ids, other_mask, n=4, past_key_values=new_cache())
    assert torch.equal(reused.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(reused.logits), torch.stack(fresh.logits), rtol=1e-5, atol=1e-5)

"""Every supported decoder family, every granularity it has, as a tiny random model: routers on is
the plain model, skipping is the plain model with those sub-layers removed, mixed decisions equal
the hand oracle, cached generation equals uncached, skipped layers store no KV (and a layer that
some rows skip holds the kept rows only), routers learn through the straight-through gate, and
saved routers load back to the same outputs."""

from __future__ import annotations

import copy

import pytest
import torch

import routertune.routing.routes as routes_module
from routertune import GRANULARITIES, RouterConfig, attach_routers, load_routers, save_routers
from routertune.kv_cache import kv_cache_bytes, kv_cache_layer_lengths, kv_layer_bytes
from routertune.routing.attach import routed_layers, router_parameters, set_thresholds
from routertune.routing.observe import router_probabilities, track_capacity

from helpers import (
    FAMILIES,
    VOCAB,
    greedy,
    hand_route,
    left_padded_batch,
    mixed_rows_model,
    randomize_routers,
    tiny_model,
    without_sublayers,
)
from oracle import straight_through_router_grads


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_routers_on_is_the_plain_model(family, granularity):
    plain = tiny_model(family)
    model = copy.deepcopy(plain)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2, threshold=0.0))
    randomize_routers(model)  # scores no longer 0.5, yet threshold 0 keeps everything
    ids, mask, _ = left_padded_batch([9, 6], seed=1)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
    assert torch.equal(greedy(model, ids, mask).sequences, greedy(plain, ids, mask).sequences)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_skipping_is_the_model_without_those_sublayers(family, granularity):
    plain = tiny_model(family)
    model = copy.deepcopy(plain)
    cfg = RouterConfig(granularity=granularity, router_layers=2, threshold=1.5)
    attach_routers(model, cfg)
    ref = without_sublayers(plain, sorted(routed_layers(model)), cfg.target)
    ids, mask, _ = left_padded_batch([10, 7], seed=2)
    valid = mask.bool()
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy(model, ids, mask).sequences, greedy(ref, ids, mask).sequences)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_mixed_decisions_equal_the_hand_oracle(family, granularity):
    plain = tiny_model(family)
    model = copy.deepcopy(plain)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    randomize_routers(model, seed=3)
    ids, mask, _ = left_padded_batch([12, 9, 12, 5], seed=4)
    expected, decisions = hand_route(model, plain, granularity, ids, mask, median=True)
    kept = torch.cat([d[mask.bool()] if d.dim() == 2 else d for d in decisions.values()])
    assert kept.any() and not kept.all()
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cached_generation_equals_uncached(family, granularity):
    model = tiny_model(family)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    randomize_routers(model, seed=5)
    if granularity.endswith("sequence"):
        # sequence routes are decided on the prompt; fix them so the uncached pass agrees
        set_thresholds(
            model, {i: (1.5 if n == 0 else 0.0) for n, i in enumerate(sorted(routed_layers(model)))}
        )
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(6))
    out = greedy(model, ids, n=7)
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits
    steps = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(steps, full[:, ids.shape[1] - 1 : -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_static_cache_equals_dynamic_cache(family, granularity):
    """Batch 1; left-padded batches below."""
    model = tiny_model(family)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    randomize_routers(model, seed=10)
    if granularity.endswith("sequence"):
        set_thresholds(model, {i: (1.5 if n == 0 else 0.0) for n, i in enumerate(sorted(routed_layers(model)))})
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(11))
    dynamic = greedy(model, ids, n=6)
    static = greedy(model, ids, n=6, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["attn_sequence", "block_sequence"])
def test_layers_skipped_at_batch_one_store_no_kv(family, granularity):
    model = tiny_model(family)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2, threshold=1.5))
    skipped = sorted(routed_layers(model))
    lengths = kv_cache_layer_lengths(greedy(model, torch.randint(3, VOCAB, (1, 8)), n=4).past_key_values)
    assert [lengths[i] for i in skipped] == [0] * len(skipped)
    assert all(n > 0 for i, n in enumerate(lengths) if i not in skipped)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_routers_get_the_straight_through_gradient(family, granularity):
    """Training computes every unit and gates it at the end of its branch: the forward value is the
    plain model, and the router gradient is the one the oracle derives from the plain model with a
    scale after each routed branch (after a post-norm where the family has one: a gate in front of
    an RMSNorm would get almost nothing, as the norm undoes a scalar)."""
    plain = tiny_model(family)
    model = copy.deepcopy(plain)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    for p in model.parameters():
        p.requires_grad_(False)
    routers = router_parameters(model)
    for p in routers:
        p.requires_grad_(True)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = plain(ids).logits
    model.train()
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)  # gate forward value: exactly 1
    out.loss.backward()
    expected = straight_through_router_grads(plain, sorted(routed_layers(model)), granularity, ids)
    for (i, unit), p in zip(routed_layers(model).items(), routers, strict=True):
        assert unit.router.proj.weight is p
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(p.grad, expected[i], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("granularity", ["attn_sequence", "mlp_token", "block_token"])
def test_save_load_round_trip(family, granularity, tmp_path):
    model = tiny_model(family)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    randomize_routers(model, seed=8)
    ids, mask, _ = left_padded_batch([9, 6], seed=9)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    save_routers(model, tmp_path / "routers")
    fresh = load_routers(tiny_model(family), tmp_path / "routers")
    with torch.no_grad():
        assert torch.equal(fresh(ids, attention_mask=mask).logits, before)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_static_cache_equals_dynamic_cache_on_left_padded_batches(family, granularity):
    """generate() builds a 4-D mask itself on a static cache; the padding it holds still reaches
    the routers, so each row is routed as on the dynamic cache (rows decide differently)."""
    model = tiny_model(family)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    randomize_routers(model, seed=12)
    ids, mask, _ = left_padded_batch([5, 9, 7], seed=13)
    with router_probabilities(model) as scores, torch.no_grad():
        model(ids, attention_mask=mask)
    # each layer's threshold halfway between two of its scores: some units kept, some skipped
    middle = {i: float(s.sort().values[len(s) // 2 - 1 : len(s) // 2 + 1].mean()) for i, s in scores.per_layer().items()}
    set_thresholds(model, middle)
    with track_capacity(model) as dynamic_stats:
        dynamic = greedy(model, ids, mask, n=5)
    with track_capacity(model) as static_stats:
        static = greedy(model, ids, mask, n=5, cache_implementation="static")
    assert static_stats.counts == dynamic_stats.counts
    assert all(0 < k < t for k, t in dynamic_stats.counts.values())  # rows / tokens decide differently
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), rtol=1e-5, atol=1e-5)


def _rows_held(layer) -> int:
    keys = getattr(layer, "keys", None)
    return int(keys.shape[0]) if isinstance(keys, torch.Tensor) and keys.numel() else 0


def test_mixed_layer_caches_only_its_kept_rows(family, monkeypatch):
    """On a dynamic cache a layer that some rows skip holds the kept rows' keys/values alone (no
    zero rows, no per-step gather); generation equals the zero-row design's, which keeps every
    row in the layer's buffer (a static cache's way)."""
    ids, mask, _ = left_padded_batch([9, 6, 9, 4], seed=15)
    model = mixed_rows_model(family, "attn_sequence", ids, mask)  # rows split in every routed layer
    compact = greedy(model, ids, mask, n=6)
    with monkeypatch.context() as m:
        m.setattr(routes_module, "COMPACT_LAYER_CLASSES", {})
        zero = greedy(model, ids, mask, n=6)
    assert torch.equal(compact.sequences, zero.sequences)
    torch.testing.assert_close(torch.stack(compact.logits), torch.stack(zero.logits), rtol=1e-5, atol=1e-5)
    routes = compact.past_key_values.__dict__[routes_module.ROUTES_ATTR]
    kept = {i: int(r.keep.sum()) for i, r in routes.items()}
    assert any(0 < k < 4 for k in kept.values()), "the test needs a layer with mixed rows"
    small_cache, full_cache = compact.past_key_values, zero.past_key_values
    for i, (small, full) in enumerate(zip(small_cache.layers, full_cache.layers, strict=True)):
        k = kept.get(i, 4)
        assert _rows_held(small) == k
        assert _rows_held(full) == (4 if k else 0)
        assert kv_layer_bytes(small) * 4 == kv_layer_bytes(full) * k  # the kept rows' bytes, no more
    assert kv_cache_bytes(small_cache) < kv_cache_bytes(full_cache)


def test_static_cache_allocates_no_kv_for_a_layer_the_whole_batch_skips(family):
    model = tiny_model(family)
    attach_routers(model, RouterConfig(granularity="attn_sequence", router_layers=3))
    skipped, *kept = sorted(routed_layers(model))
    set_thresholds(model, {skipped: 2.0, **{i: 0.0 for i in kept}})
    ids, mask, _ = left_padded_batch([5, 9, 7], seed=14)
    cache = greedy(model, ids, mask, n=3, cache_implementation="static").cache
    assert getattr(cache.layers[skipped], "keys", None) is None  # its buffer was never allocated
    assert all(getattr(cache.layers[i], "keys", None) is not None for i in kept)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_bfloat16_routers_on_gated_training_and_skipping(family, granularity):
    """In bf16: routers on equal the plain bf16 model bitwise, in eval mode and through the
    training gate (a hard 1 stays exactly 1 in bf16), and skipping equals the bf16 model with
    those sub-layers removed (measured bitwise; tested to bf16's resolution)."""
    plain = tiny_model(family).to(torch.bfloat16)
    model = copy.deepcopy(plain)
    cfg = RouterConfig(granularity=granularity, router_layers=2)
    attach_routers(model, cfg)
    ids, mask, _ = left_padded_batch([9, 6], seed=15)
    valid = mask.bool()
    with torch.no_grad():
        want = plain(ids, attention_mask=mask).logits[valid]
        assert torch.equal(model(ids, attention_mask=mask).logits[valid], want)
    model.train()
    set_thresholds(model, 0.3)  # fresh routers score 0.5: every unit kept, through the gate
    assert torch.equal(model(ids, attention_mask=mask).logits.detach()[valid], want)
    model.eval()
    set_thresholds(model, 2.0)
    ref = without_sublayers(plain, sorted(routed_layers(model)), cfg.target)
    with torch.no_grad():
        got, skipped = model(ids, attention_mask=mask).logits[valid], ref(ids, attention_mask=mask).logits[valid]
    torch.testing.assert_close(got.float(), skipped.float(), rtol=1e-2, atol=1e-2)

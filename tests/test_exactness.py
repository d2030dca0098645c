"""Routed models against an independent oracle (tests/oracle.py): decisions recomputed by hand from
the router weights, references built from the plain model with the skipped sub-layers' outputs
zeroed. Each test is built so that a specific plausible bug in the routing code changes its result:
the keep boundary, padding in the sequence mean, query positions of cached token attention, and
cache batch operations that must carry the stored routes along."""

from __future__ import annotations

import copy

import pytest
import torch

from routertune import GRANULARITIES, RouterConfig, attach_routers
from routertune.routing.attach import routed_layers, set_thresholds

from helpers import VOCAB, hand_route, left_padded_batch, randomize_routers, tiny_model
from oracle import capture_attention_input


def routed_copy(plain, granularity, router_layers=3, seed=0, scale=2.0):
    model = copy.deepcopy(plain)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=router_layers))
    randomize_routers(model, seed=seed, scale=scale)
    return model


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_mixed_decisions_equal_the_hand_oracle(arch, granularity):
    plain = tiny_model(arch)
    model = routed_copy(plain, granularity, seed=1)
    ids, mask, _ = left_padded_batch([12, 9, 12, 5], seed=2)
    expected, decisions = hand_route(model, plain, granularity, ids, mask, median=True)
    kept = torch.cat([d[mask.bool()] if d.dim() == 2 else d for d in decisions.values()])
    assert kept.any() and not kept.all(), "the test needs mixed decisions"
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_score_equal_to_threshold_is_kept(granularity):
    """Zero routers score exactly 0.5: at threshold 0.5 every unit is kept (keep iff score >= t)."""
    plain = tiny_model("llama")
    model = copy.deepcopy(plain)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2, threshold=0.5))
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


@pytest.mark.parametrize("granularity", ["attn_sequence", "mlp_sequence", "block_sequence"])
def test_sequence_decisions_exclude_padding(arch, granularity):
    """Thresholds sit between each padded row's score with and without its padding, so a mean that
    counted padding tokens would flip those rows' decisions."""
    plain = tiny_model(arch)
    model = routed_copy(plain, granularity, router_layers=2, seed=5, scale=3.0)
    ids, mask, seqs = left_padded_batch([10, 3, 10], seed=6)
    layer = min(routed_layers(model))
    x = capture_attention_input(plain, layer, ids, attention_mask=mask).float()
    w_vec = routed_layers(model)[layer].router.proj.weight.detach().float().reshape(-1, 1)
    w = mask.float().unsqueeze(-1)
    without_pad = torch.sigmoid(((x * w).sum(1) / w.sum(1)) @ w_vec).reshape(-1)
    with_pad = torch.sigmoid(x.mean(1) @ w_vec).reshape(-1)
    assert abs(float(without_pad[1] - with_pad[1])) > 1e-3, "padding must move the padded row's score"
    set_thresholds(model, {layer: float((without_pad[1] + with_pad[1]) / 2)})
    expected, _ = hand_route(model, plain, granularity, ids, mask)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        alone = model(seqs[1].unsqueeze(0)).logits[0]
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1, -3:], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decode", ["kept_rows", "masked"])
@pytest.mark.parametrize("granularity", ["attn_token", "mlp_token", "block_token"])
def test_token_attention_continued_from_a_cache(arch, granularity, decode, monkeypatch):
    """A prefix through the cache, then a multi-token chunk and a one-token step with mixed
    per-token decisions: their queries sit after the cached keys (without padding transformers
    passes no mask to a one-token step, so the kept queries' positions must be right by themselves),
    and the one-token step of the batch either runs the kept rows alone (the decision is on the
    host: CPU) or computes every row and zeroes the skipped ones (an accelerator's decision)."""
    from transformers import DynamicCache

    from routertune.routing import layers

    if decode == "masked":
        monkeypatch.setattr(layers, "decision_on_host", lambda keep: False)
    plain = tiny_model(arch)
    model = routed_copy(plain, granularity, seed=7)
    ids = torch.randint(3, VOCAB, (4, 15), generator=torch.Generator().manual_seed(13))
    expected, decisions = hand_route(model, plain, granularity, ids, median=True)
    assert all(d[:, 8:14].any() and not d[:, 8:14].all() for d in decisions.values())
    last = torch.stack([d[:, 14] for d in decisions.values()])  # (layers, B)
    assert (last.any(1) & ~last.all(1)).any(), "the one-token step needs a layer with mixed rows"
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        chunks = [
            model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 8), (8, 14), (14, 15))
        ]
        whole = model(ids).logits
    torch.testing.assert_close(torch.cat(chunks, 1), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole, expected, rtol=1e-4, atol=1e-4)


def _prefill(model, ids, mask):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache, use_cache=True)
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


def _step(model, cache, token, mask):
    mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    with torch.no_grad():
        return model(token, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1], mask


@pytest.mark.parametrize("op", ["batch_select_indices", "batch_repeat_interleave", "reorder_cache"])
@pytest.mark.parametrize("granularity", ["attn_sequence", "mlp_sequence", "block_sequence"])
def test_cache_batch_operations_carry_the_routes(op, granularity):
    """After a batch-reshaping cache operation, a decode step equals the same step of a batch built
    from scratch in the new row order, when rows take different routes."""
    plain = tiny_model("llama")
    model = routed_copy(plain, granularity, seed=9)
    ids, mask, _ = left_padded_batch([9, 6, 9], seed=10)
    _, decisions = hand_route(model, plain, granularity, ids, mask, median=True)
    assert any(0 < int(d.sum()) < 3 for d in decisions.values()), "rows must take different routes"
    rows = {
        "batch_select_indices": torch.tensor([2, 0]),
        "batch_repeat_interleave": torch.tensor([0, 0, 1, 1, 2, 2]),
        "reorder_cache": torch.tensor([1, 2, 0]),
    }[op]
    cache, token = _prefill(model, ids, mask)
    if op == "batch_repeat_interleave":
        cache.batch_repeat_interleave(2)
    else:
        getattr(cache, op)(rows)
    got, _ = _step(model, cache, token[rows], mask[rows])
    fresh_cache, fresh_token = _prefill(model, ids[rows], mask[rows])
    assert torch.equal(fresh_token, token[rows])
    want, _ = _step(model, fresh_cache, fresh_token, mask[rows])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

"""Routing under each attention kernel a user can pick (``attn_implementation``).

transformers hands a decoder layer a different mask per kernel: ``eager`` and ``sdpa`` a 4-D
tensor, ``flex_attention`` a BlockMask whose ``mask_mod`` reads the batch index (the padding of
that row), ``flash_attention_*`` the 2-D padding mask. A routed layer cuts that mask to the rows
it keeps (routertune.routing.masks). Here: under eager (every family) and flex attention (real,
compiled by transformers through inductor), routers on are the plain model, skipping is the
model without those sub-layers, mixed decisions equal the hand oracle, a layer that some rows
skip runs its attention on the kept rows alone, and generation routes exactly as under sdpa.

flash_attention_2 needs a CUDA build of flash-attn and is checked by benchmarks/gpu_check.sh.
flex attention on this CPU: transformers compiles its kernel with inductor (seconds per shape);
the generation test uses an unpadded batch because inductor's CPU flex template fails to
compile the decode step of a left-padded batch for the plain model too (torch 2.13).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from routertune import GRANULARITIES, RouterConfig, attach_routers
from routertune.routing import masks
from routertune.routing.attach import routed_layers, set_thresholds

from helpers import (
    FAMILIES,
    VOCAB,
    greedy,
    hand_route,
    left_padded_batch,
    randomize_routers,
    tiny_model,
    without_sublayers,
)
from oracle import sublayer


def _routed(plain, granularity, **config):
    model = copy.deepcopy(plain)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2, **config))
    return model


def _rows_into_attention(model) -> list[tuple[int, int]]:
    """(layer, batch rows) of every call of the routed layers' own attention projections."""
    seen: list[tuple[int, int]] = []
    for i in routed_layers(model):
        inner = sublayer(model, i, "attn").base_layer
        proj = next(m for m in inner.modules() if isinstance(m, torch.nn.Linear))  # its first projection
        proj.register_forward_hook(lambda m, a, o, i=i: seen.append((i, a[0].shape[0])))
    return seen


# ---- eager: every family, every granularity --------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_eager_routers_on_and_skipping(family, granularity):
    plain = tiny_model(family, attn_implementation="eager")
    ids, mask, _ = left_padded_batch([9, 6], seed=1)
    valid = mask.bool()
    model = _routed(plain, granularity, threshold=0.0)
    randomize_routers(model)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
    set_thresholds(model, 1.5)
    ref = without_sublayers(plain, sorted(routed_layers(model)), RouterConfig(granularity=granularity).target)
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_eager_mixed_decisions_and_generation_equal_sdpa(family, granularity):
    """Mixed decisions under eager equal the hand oracle, and left-padded greedy generation with
    rows that route differently gives sdpa's tokens and logits."""
    ids, mask, _ = left_padded_batch([12, 9, 12, 5], seed=4)
    models = {}
    for kernel in ("eager", "sdpa"):
        plain = tiny_model(family, attn_implementation=kernel)
        models[kernel] = _routed(plain, granularity)
        randomize_routers(models[kernel], seed=3)
        expected, _ = hand_route(models[kernel], plain, granularity, ids, mask, median=True)
        if kernel == "eager":
            with torch.no_grad():
                got = models[kernel](ids, attention_mask=mask).logits
            torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-4)
    eager, sdpa = (greedy(models[k], ids, mask, n=5) for k in ("eager", "sdpa"))
    assert torch.equal(eager.sequences, sdpa.sequences)
    torch.testing.assert_close(torch.stack(eager.logits), torch.stack(sdpa.logits), rtol=1e-4, atol=1e-4)


# ---- flex attention: the BlockMask cut to kept rows ------------------------------------------
def test_block_mask_rows_are_exact():
    """A BlockMask cut to some batch rows (block tables sliced by torch, ``mask_mod`` mapped back
    to the original rows) gives those rows' attention exactly, partial blocks included."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, S, D = 4, 2, 200, 8
    lengths = torch.tensor([200, 57, 131, 9])  # left padding of different lengths
    start = S - lengths

    def padded_causal(b, h, q, kv):
        return (kv <= q) & (kv >= start[b])

    full = create_block_mask(padded_causal, B, None, S, S, device="cpu", BLOCK_SIZE=64)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    rows = torch.tensor([1, 3])
    cut = masks.select_mask_rows(full, rows, B)
    assert masks.mask_batch(cut) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex attention run eagerly (the reference path) warns
        want = flex_attention(q, k, v, block_mask=full)[rows]
        got = flex_attention(q[rows], k[rows], v[rows], block_mask=cut)
    valid = torch.arange(S).view(1, S) >= start[rows].view(2, 1)  # rows' real queries
    torch.testing.assert_close(got.transpose(1, 2)[valid], want.transpose(1, 2)[valid], rtol=1e-6, atol=1e-6)
    assert masks.select_mask_rows(full[:1], rows, B).kv_num_blocks.shape[0] == 1  # broadcast: as is


FLEX_GRANULARITIES = ("attn_sequence", "attn_token", "block_token")


@pytest.fixture(scope="module")
def flex_models():
    """Tiny Llama and Mistral (sliding window) under flex attention, plain, built once."""
    return {f: tiny_model(f, attn_implementation="flex_attention") for f in ("llama", "mistral")}


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("granularity", FLEX_GRANULARITIES)
def test_flex_attention_routes_exactly_and_runs_kept_rows_only(flex_models, family, granularity):
    plain = flex_models[family]
    ids, mask, _ = left_padded_batch([12, 9, 12, 5], seed=4)
    valid = mask.bool()
    model = _routed(plain, granularity, threshold=0.0)
    randomize_routers(model, seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
    expected, decisions = hand_route(model, plain, granularity, ids, mask, median=True)
    rows = _rows_into_attention(model)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
    if granularity.endswith("sequence"):  # mixed rows: the attention ran on the kept rows alone
        kept = {i: int(d.sum()) for i, d in decisions.items()}
        assert any(0 < k < 4 for k in kept.values())
        assert sorted(rows) == sorted((i, k) for i, k in kept.items() if k)


@pytest.mark.parametrize("granularity", FLEX_GRANULARITIES)
def test_flex_attention_generation_routes_as_sdpa(flex_models, granularity):
    ids = torch.randint(3, VOCAB, (4, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    out = {}
    for kernel in ("sdpa", "flex_attention"):
        plain = flex_models["llama"] if kernel == "flex_attention" else tiny_model("llama")
        model = _routed(plain, granularity)
        randomize_routers(model, seed=3)
        hand_route(model, plain, granularity, ids, mask, median=True)
        out[kernel] = greedy(model, ids, mask, n=5)
    assert torch.equal(out["flex_attention"].sequences, out["sdpa"].sequences)
    torch.testing.assert_close(
        torch.stack(out["flex_attention"].logits), torch.stack(out["sdpa"].logits), rtol=1e-5, atol=1e-5
    )

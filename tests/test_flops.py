"""FLOP counting: hand-computed numbers, torch's own counter, and the routed/deleted identities."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config

from routertune import GRANULARITIES, RouterConfig, attach_routers
from routertune.benchmark import force_skip, sublayers_deleted
from routertune.benchmark.flops import (
    DENSE,
    LayerWork,
    ModelShape,
    attention_pairs,
    deleted_work,
    deleted_works,
    forward_flops,
    ideal_speedup,
    phase_flops,
    routed_work,
    routed_works,
)

TOY = ModelShape(hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10, num_layers=2)


def test_attention_pairs_by_hand():
    assert attention_pairs(4, 0) == 1 + 2 + 3 + 4
    assert attention_pairs(1, 5) == 6  # one decode step after 5 cached tokens
    assert attention_pairs(3, 2) == 3 + 4 + 5
    assert attention_pairs(5, 0, window=3) == 1 + 2 + 3 + 3 + 3
    assert attention_pairs(2, 7, window=3) == 3 + 3
    assert attention_pairs(4, 2, causal=False) == 4 * 6


@given(
    n=st.integers(0, 40),
    past=st.integers(0, 40),
    window=st.one_of(st.none(), st.integers(1, 50)),
)
def test_attention_pairs_matches_brute_force(n, past, window):
    expected = sum(min(past + i, window) if window else past + i for i in range(1, n + 1))
    assert attention_pairs(n, past, window) == expected


def test_forward_flops_by_hand():
    # Per layer, 3 tokens, empty cache:
    #   q and o: 2 * (2*3*8*8) = 768;  k and v: 2 * (2*3*8*4) = 384
    #   scores + values: 2 * (2*H*D*pairs) = 2 * (2*2*4*6) = 192;  gated MLP: 3 * (2*3*8*16) = 2304
    # Two layers: 2 * 3648 = 7296; lm_head on the last position: 2*8*10 = 160.
    flops = forward_flops(TOY, new_tokens=3, past=0, batch=1)
    assert flops.parts == {"q_o": 1536, "kv": 768, "core": 384, "mlp": 4608, "router": 0, "lm_head": 160}
    assert flops.total == 7456
    assert forward_flops(TOY, 3, 0, batch=2).total == 2 * 7456
    # All three positions through the lm_head.
    assert forward_flops(TOY, 3, 0, logits=3).total == 7296 + 3 * 160


def test_decode_phase_is_the_sum_of_single_token_steps():
    steps = sum(forward_flops(TOY, 1, 5 + s, batch=3).total for s in range(4))
    assert phase_flops(TOY, "decode", context=5, batch=3, new_tokens=4).total == steps
    assert phase_flops(TOY, "prefill", context=5, batch=3).total == forward_flops(TOY, 5, 0, 3).total
    with pytest.raises(ValueError, match="phase"):
        phase_flops(TOY, "train", 5)


def test_routed_work_table():
    assert routed_work("attn_sequence", 0.25) == LayerWork(q_o=0.25, kv=0.25, core=0.25, mlp=1.0, router="sequence")
    # Token routing still computes keys and values for every token.
    assert routed_work("attn_token", 0.0) == LayerWork(q_o=0.0, kv=1.0, core=0.0, mlp=1.0, router="token")
    assert routed_work("mlp_token", 0.5) == LayerWork(mlp=0.5, router="token")
    assert routed_work("block_sequence", 0.0) == LayerWork(0.0, 0.0, 0.0, 0.0, "sequence")
    assert routed_work("block_token", 0.0) == LayerWork(0.0, 1.0, 0.0, 0.0, "token")
    with pytest.raises(ValueError, match="capacity"):
        routed_work("attn_sequence", 1.5)
    with pytest.raises(ValueError, match="granularity"):
        routed_work("attn_layer", 0.5)
    with pytest.raises(ValueError, match="target"):
        deleted_work("embed")


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_ideal_speedup_is_one_when_everything_is_kept(granularity, phase):
    caps = {1: 1.0, 2: 1.0}
    shape = ModelShape(8, 2, 1, 4, 16, 10, 4)
    dense = phase_flops(shape, phase, 7, 2, new_tokens=3)
    # Threshold 0 decides without scoring: no router work, exactly the dense count.
    routed = phase_flops(shape, phase, 7, 2, routed_works(granularity, caps, scored=set()), new_tokens=3)
    assert routed.total == dense.total
    # Scoring routers add a little work, so keeping everything then costs slightly more.
    assert ideal_speedup(shape, granularity, caps, phase, 7, 2, 3) <= 1.0


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_all_skipped_matches_deleted_sublayers(granularity):
    shape = ModelShape(8, 2, 1, 4, 16, 10, 4)
    target, unit = granularity.split("_")
    routed = phase_flops(shape, "prefill", 9, 2, routed_works(granularity, {1: 0.0, 2: 0.0}, scored=set()))
    deleted = phase_flops(shape, "prefill", 9, 2, deleted_works(target, [1, 2]))
    if unit == "sequence" or target == "mlp":
        assert routed.total == deleted.total
    else:
        # Skipped tokens keep their keys/values: exactly the k/v projections more than deleting.
        assert routed.total - deleted.total == deleted_kv_projection_flops(shape, tokens=9, batch=2, layers=2)


def deleted_kv_projection_flops(shape: ModelShape, tokens: int, batch: int, layers: int) -> int:
    return layers * batch * 2 * (2 * tokens * shape.hidden * shape.kv_heads * shape.head_dim)


def test_shape_from_configs_reads_windows_and_head_dim():
    llama = ModelShape.from_config(LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=3))
    assert (llama.head_dim, llama.kv_heads, llama.windows) == (16, 4, (None, None, None))
    mistral = ModelShape.from_config(MistralConfig(num_hidden_layers=2, sliding_window=6, hidden_size=64,
                                                   num_attention_heads=4, head_dim=16))
    assert mistral.windows == (6, 6)
    qwen = ModelShape.from_config(
        Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    )
    assert qwen.windows == (None, None, 8, 8)
    # A window caps the attention pairs of the layers that have it.
    unwindowed = dataclasses.replace(mistral, windows=(None, None))
    assert forward_flops(mistral, 10, 0).parts["core"] < forward_flops(unwindowed, 10, 0).parts["core"]
    with pytest.raises(ValueError, match="layers"):
        forward_flops(TOY, 1, 0, works={5: DENSE})


def _eager_llama(layers: int = 4):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=80, attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def _counted(model, ids) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, logits_to_keep=1)
    return counter.get_total_flops()


def test_counts_agree_with_torch_flop_counter_dense_and_deleted():
    """torch counts every matmul (eager attention: the full score rectangle, hence causal=False)."""
    model = _eager_llama()
    shape = ModelShape.from_config(model.config)
    ids = torch.randint(0, 80, (3, 11))
    assert _counted(model, ids) == forward_flops(shape, 11, 0, batch=3, causal=False).total

    attach_routers(model, RouterConfig(router_layers=2))  # layers 1, 2
    skipped = force_skip(model, 0.5)  # layer 2: threshold 2.0, decided without scoring
    assert skipped == [2]
    expected = forward_flops(shape, 11, 0, 3, deleted_works("attn", skipped), causal=False).total
    assert _counted(model, ids) == expected  # the routed model really skips that work
    with sublayers_deleted(model, skipped, "attn"):
        assert _counted(model, ids) == expected


def test_scoring_router_is_counted():
    model = _eager_llama()
    shape = ModelShape.from_config(model.config)
    attach_routers(model, RouterConfig(granularity="attn_token", router_layers=2))  # zero routers: keep all
    ids = torch.randint(0, 80, (2, 5))
    works = routed_works("attn_token", {1: 1.0, 2: 1.0})
    assert _counted(model, ids) == forward_flops(shape, 5, 0, 2, works, causal=False).total

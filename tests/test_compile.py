"""torch.compile of routed models: one decode graph whatever the routes, compiled = eager.

Most tests count dynamo's graphs with a backend that runs them uncompiled (tracing is what
decides graph breaks and recompilations, and it takes seconds); one test runs inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CompileConfig

from routertune import GRANULARITIES, RouterConfig, attach_routers, track_capacity
from routertune.routing.attach import routed_layers, set_thresholds
from routertune.routing.compiled import CompiledRoutingError, compile_kept_sublayers, decode_call, encode_call

from helpers import FAMILIES, greedy, left_padded_batch, randomize_routers, tiny_model, without_sublayers


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's compiled code is per code object and process-wide: each test starts from none
    (or the models of earlier tests count against the recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graph_counter(compile_with_inductor: bool = False):
    """A dynamo backend that records each graph it is given (and compiles it with inductor, or not)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        if compile_with_inductor:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward

    return graphs, backend


def generate_compile_config(backend) -> CompileConfig:
    """generate()'s own compilation of its decode steps, on CPU, with no graph break allowed."""
    config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    config._compile_all_devices = True  # generate compiles on accelerators only unless told
    return config


def routed_model(family: str, granularity: str, seed: int = 3):
    model = tiny_model(family)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    randomize_routers(model, seed=seed, scale=3.0)
    return model


# Requests whose routes differ: left-padded batches of four prompts with scored routers (the
# default threshold), then thresholds that fix each routed layer in turn (2.0 skips, 0.0 keeps).
REQUESTS = [
    (0.5, [9, 5, 7, 6], 0),
    (0.5, [8, 8, 4, 6], 1),
    (0.5, [5, 9, 6, 7], 2),
    ((2.0, 0.0), [9, 5, 7, 6], 0),
    ((0.0, 0.0), [9, 5, 7, 6], 0),
    ((2.0, 2.0), [9, 5, 7, 6], 0),
]


def _set_request_thresholds(model, thresholds) -> None:
    if isinstance(thresholds, tuple):  # one per routed layer, shallowest first (fewer if fewer are routed)
        thresholds = dict(zip(sorted(routed_layers(model)), thresholds, strict=False))
    set_thresholds(model, thresholds)


def _compare_requests(model, compiled_generate, requests=REQUESTS, n=5):
    """Runs every request eagerly and through ``compiled_generate``; returns the distinct route
    patterns (per-layer kept counts) the requests took."""
    patterns = set()
    for thresholds, lengths, seed in requests:
        _set_request_thresholds(model, thresholds)
        ids, mask, _ = left_padded_batch(lengths, seed=seed)
        with track_capacity(model) as eager_stats:
            eager = greedy(model, ids, mask, n=n, cache_implementation="static", disable_compile=True)
        with track_capacity(model) as compiled_stats:
            compiled = compiled_generate(ids, mask, n)
        assert compiled_stats.counts == eager_stats.counts
        assert torch.equal(compiled.sequences, eager.sequences)
        torch.testing.assert_close(
            torch.stack(compiled.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5
        )
        patterns.add(tuple(sorted(eager_stats.counts.items())))
    return patterns


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_compiled_decode_is_one_graph_whatever_the_routes(granularity):
    model = routed_model("llama", granularity)
    graphs, backend = graph_counter()
    patterns = _compare_requests(model, generate_compiled_by_generate(model, backend))
    assert len(patterns) >= 5  # the requests really took different routes
    assert len(graphs) == 1


def _plain_graph_count(family: str, requests, n: int, compiled_generate_of) -> int:
    """Graphs compiled for the plain model over the same requests (a sliding-window cache, for
    one, specialises on whether it is full: 2 in Mistral; a new prompt length recompiles a
    compiled prefill once, with a dynamic length)."""
    torch._dynamo.reset()  # dynamo remembers which sizes changed per code object
    plain = tiny_model(family)
    graphs, backend = graph_counter()
    compiled_generate = compiled_generate_of(plain, backend)
    for _, lengths, seed in requests:
        ids, mask, _ = left_padded_batch(lengths, seed=seed)
        compiled_generate(ids, mask, n)
    return len(graphs)


def generate_compiled_by_generate(model, backend):
    config = generate_compile_config(backend)

    def compiled_generate(ids, mask, n):
        return greedy(model, ids, mask, n=n, cache_implementation="static", compile_config=config)

    return compiled_generate


def generate_with_compiled_forward(model, backend):
    """transformers' fast-generation recipe: ``model.forward = torch.compile(model.forward,
    fullgraph=True)`` (prefill and decode compiled, hooks of ``model`` eager)."""
    eager_forward = model.forward
    compiled_forward = torch.compile(model.forward, fullgraph=True, backend=backend)

    def compiled_generate(ids, mask, n):
        model.forward = compiled_forward
        try:
            return greedy(model, ids, mask, n=n, cache_implementation="static")
        finally:
            model.forward = eager_forward

    return compiled_generate


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", ["attn_sequence", "block_token"])
def test_compiled_decode_equals_eager_in_every_family(family, granularity):
    """Compiled = eager, and routing adds no graph to those the plain model needs."""
    model = routed_model(family, granularity)
    graphs, backend = graph_counter()
    requests = REQUESTS[:2] + REQUESTS[3:4]
    _compare_requests(model, generate_compiled_by_generate(model, backend), requests=requests, n=4)
    assert len(graphs) == _plain_graph_count(family, requests, 4, generate_compiled_by_generate)


@pytest.mark.parametrize("granularity", ["attn_sequence", "mlp_token"])
def test_compiled_forward_recipe_compiles_what_the_plain_model_does(granularity):
    """The recipe compiles prefill too, with no graph break allowed: every route runs in the
    graphs the plain model needs."""
    model = routed_model("llama", granularity)
    graphs, backend = graph_counter()
    patterns = _compare_requests(model, generate_with_compiled_forward(model, backend))
    assert len(patterns) >= 5
    assert len(graphs) == _plain_graph_count("llama", REQUESTS, 5, generate_with_compiled_forward)


def _routertune_ops(graphs) -> int:
    return sum(
        "routertune" in str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"
    )


@pytest.mark.parametrize("granularity", ["attn_sequence", "mlp_token", "block_sequence"])
def test_thresholds_that_fix_the_decision_compile_as_plain_or_deleted_sublayers(granularity):
    """Threshold 0 / above 1 are part of the model (the attention-drop baseline, forced skips):
    the graph holds the sub-layer as plain or deleted, with no op, and equals the model with
    those sub-layers deleted."""
    model = routed_model("llama", granularity)
    first, second = sorted(routed_layers(model))
    set_thresholds(model, {first: 2.0, second: 0.0})
    deleted = without_sublayers(tiny_model("llama"), [first], granularity.split("_")[0])
    graphs, backend = graph_counter()
    config = generate_compile_config(backend)
    for lengths, seed in (([9, 5, 7, 6], 0), ([6, 8, 8, 3], 1)):
        ids, mask, _ = left_padded_batch(lengths, seed=seed)
        reference = greedy(deleted, ids, mask, n=4, cache_implementation="static", disable_compile=True)
        compiled = greedy(model, ids, mask, n=4, cache_implementation="static", compile_config=config)
        assert torch.equal(compiled.sequences, reference.sequences)
        torch.testing.assert_close(
            torch.stack(compiled.logits), torch.stack(reference.logits), rtol=1e-5, atol=1e-5
        )
    assert len(graphs) == 1 and _routertune_ops(graphs) == 0
    # scored routers (and observed ones) are ops in the graph
    set_thresholds(model, 0.5)
    greedy(model, ids, mask, n=2, cache_implementation="static", compile_config=config)
    assert len(graphs) == 2 and _routertune_ops(graphs[1:]) > 0


def test_kept_sublayers_run_as_compiled_regions_inside_the_ops():
    """compile_kept_sublayers: a sub-layer an op runs on the whole batch is a compiled region of
    its own (one per routed sub-layer, whatever the requests); outputs unchanged."""
    graphs, backend = graph_counter()
    regions, region_backend = graph_counter()
    compile_kept_sublayers(True, backend=region_backend)
    try:
        model = routed_model("llama", "block_sequence")
        # 1e-6 is a scored threshold that keeps every row (an op runs the plain sub-layers)
        requests = [(1e-6, [9, 5, 7, 6], 0), REQUESTS[0], (1e-6, [8, 8, 4, 6], 1)]
        _compare_requests(model, generate_compiled_by_generate(model, backend), requests=requests)
    finally:
        compile_kept_sublayers(False)
    assert len(graphs) == 1
    # one attention graph per routed layer (each guards on its layer index), one MLP graph for all
    assert len(regions) == len(routed_layers(model)) + 1


def test_inductor_compiled_generate_equals_eager():
    model = routed_model("llama", "block_sequence")
    graphs, backend = graph_counter(compile_with_inductor=True)
    _compare_requests(
        model, generate_compiled_by_generate(model, backend), requests=REQUESTS[:2] + REQUESTS[3:4]
    )
    assert len(graphs) == 1


def test_a_copied_model_routes_with_its_own_routers_when_compiled():
    model = routed_model("llama", "attn_sequence")
    twin = copy.deepcopy(model)
    set_thresholds(twin, 2.0)  # the copy skips every routed layer, the original decides
    graphs, backend = graph_counter()
    config = generate_compile_config(backend)
    ids, mask, _ = left_padded_batch([9, 5, 7, 6], seed=0)
    for m in (model, twin):
        eager = greedy(m, ids, mask, n=4, cache_implementation="static", disable_compile=True)
        compiled = greedy(m, ids, mask, n=4, cache_implementation="static", compile_config=config)
        torch.testing.assert_close(
            torch.stack(compiled.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5
        )
    plain = greedy(model, ids, mask, n=4, cache_implementation="static", disable_compile=True)
    skipped = greedy(twin, ids, mask, n=4, cache_implementation="static", disable_compile=True)
    assert not torch.allclose(torch.stack(plain.logits), torch.stack(skipped.logits))


def test_a_copied_cache_is_refused_by_a_compiled_call():
    """A copy of a request's cache carries the original's registry key; a compiled call that
    never ran it eagerly must not route it with the original's cache."""
    from transformers import StaticCache

    model = routed_model("llama", "attn_sequence")
    ids, mask, _ = left_padded_batch([6, 6], seed=0)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    copied = copy.deepcopy(cache)
    _, backend = graph_counter()
    compiled_call = torch.compile(model.__call__, backend=backend)
    step = torch.full((2, 1), 5)
    with torch.no_grad(), pytest.raises(CompiledRoutingError, match="has not registered"):
        compiled_call(
            input_ids=step,
            attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
            cache=copied,
            use_cache=True,
        )


def test_call_spec_round_trip():
    cache = object()
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    args = (a, (b, c))
    kwargs = {"attention_mask": None, "past_key_values": cache, "use_cache": True, "layer": -3, "rows": [a]}
    spec, tensors = encode_call(args, kwargs, cache)
    assert len(tensors) == 4
    back_args, back_kwargs = decode_call(spec, tensors, cache)
    assert back_args[0] is a and back_args[1][0] is b and back_args[1][1] is c
    assert back_kwargs["attention_mask"] is None and back_kwargs["past_key_values"] is cache
    assert back_kwargs["use_cache"] is True and back_kwargs["layer"] == -3 and back_kwargs["rows"][0] is a
    with pytest.raises(CompiledRoutingError, match="'scale' of type float"):
        encode_call((), {"scale": 0.5}, cache)

"""Routed vLLM models: vLLM's own model classes with the routed layers' ``self_attn`` wrapped.

``RoutertuneLlamaForCausalLM`` is ``vllm...llama.LlamaForCausalLM`` (its forward, its weights, its
layers), with each routed layer's attention replaced by :class:`RoutedSelfAttention`, which holds
vLLM's module as ``base_layer`` and calls it for the requests that keep the layer.

The route (attn_sequence, MindSkip): per request and routed layer, keep iff
``sigmoid(w . mean(x)) - threshold >= 0``, ``x`` the layer's input-layernormed hidden states over
the request's prompt tokens; decided in the step that carries the whole prompt and held for every
later step. In a mixed step the kept requests run vLLM's attention on their own slice of the
attention metadata, so a skipped request's attention is not computed and its KV is not written;
its output there is zero (the residual stream passes unchanged, as when the sub-layer is deleted).

Under vLLM's compilation the whole routed attention is one opaque custom op
(``torch.ops.routertune_vllm.routed_attention``): dynamo traces the model once at start, and any
Python branching on routes in the traced code would be frozen into the graph.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from routertune.serving.extra_args import RequestArgumentError, RequestRouting, parse_request_routing
from routertune.serving.families import VLLM_FAMILIES, routed_architecture
from routertune.serving.folder import CONFIG_KEY, ServingError, layer_thresholds, load_router_folder

logger = logging.getLogger("routertune.serving")

# Routes of finished requests kept for reporting (collective_rpc "routertune_routes").
FINISHED_ROUTES_KEPT = 4096

# Per process: the op's key -> its wrapper, for the custom op to find it. The key is the attention
# layer's name behind the routed model's number in this process: stable across runs (vLLM may cache
# compiled graphs, which hold it as a constant), distinct when one process holds two models.
_WRAPPERS: dict[str, RoutedSelfAttention] = {}
_MODELS_BUILT = 0


class RouteBook:
    """Each request's route (routed layer -> kept), shared by the routed layers of one model."""

    def __init__(self, thresholds: dict[int, float]) -> None:
        global _MODELS_BUILT
        self.model_number = _MODELS_BUILT
        _MODELS_BUILT += 1
        self.thresholds = thresholds
        self.runner: Any = None
        self.routes: dict[str, dict[int, bool]] = {}
        self.finished: OrderedDict[str, dict[int, bool]] = OrderedDict()
        self._ctx: Any = None
        self._step: Step | None = None
        # The current pass's sliced metadata by (metadata object, kept requests): layers with the
        # same route in one pass share one slice (the metadata object is shared by a KV group).
        self._slices: dict[tuple, tuple[Any, torch.Tensor]] = {}

    def bind(self, runner: Any) -> None:
        if not hasattr(runner, "input_batch") or not hasattr(runner, "requests"):
            raise ServingError(
                f"routertune needs vLLM's v1 model runner (input_batch, requests); got {type(runner).__name__}"
            )
        self.runner = runner

    def finish(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            route = self.routes.pop(rid, None)
            if route is not None:
                self.finished[rid] = route
        while len(self.finished) > FINISHED_ROUTES_KEPT:
            self.finished.popitem(last=False)

    def report(self, request_ids: Iterable[str]) -> dict[str, dict[str, list[int]] | None]:
        """For each request id (the engine's, or the one the client gave), its routed and
        skipped layers; None for an id not seen (or forgotten)."""
        out: dict[str, dict[str, list[int]] | None] = {}
        for rid in request_ids:
            route = self._lookup(rid)
            out[rid] = (
                None
                if route is None
                else {
                    "routed_layers": sorted(route),
                    "skipped_layers": sorted(i for i, kept in route.items() if not kept),
                }
            )
        return out

    def _lookup(self, rid: str) -> dict[int, bool] | None:
        for table in (self.routes, self.finished):
            if rid in table:
                return table[rid]
            # The engine appends "-<8 random characters>" to the id a client gives.
            for key in reversed(table):
                if key.startswith(rid + "-") and len(key) == len(rid) + 9:
                    return table[key]
        return None

    def stats(self) -> dict[str, Any]:
        """Since start, over real steps: each routed layer's tokens attended (whose KV it wrote),
        and the seconds spent in the routed ops and, inside them, in vLLM's attention modules (the
        difference is routing: decisions, metadata slicing, gather and scatter)."""
        wrappers = [w for w in _WRAPPERS.values() if w.book is self]
        return {
            "tokens_attended": {w.layer_idx: w.tokens_attended for w in wrappers},
            "op_seconds": sum(w.op_seconds for w in wrappers),
            "attention_seconds": sum(w.attention_seconds for w in wrappers),
        }

    def step(self, ctx: Any, meta: Any) -> Step:
        """The requests of the current forward pass, worked out once per pass."""
        if self._ctx is ctx and self._step is not None:
            return self._step
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        starts = meta.query_start_loc[: num_reqs + 1].tolist()
        req_ids = list(batch.req_ids[:num_reqs])
        new, controls = [], []
        for r, rid in enumerate(req_ids):
            state = self.runner.requests[rid]
            if rid in self.routes:  # held: its controls were read when its route was decided
                new.append(False)
                controls.append(None)
                continue
            prompt_len = len(state.prompt_token_ids or ())
            if state.num_computed_tokens != 0 or starts[r + 1] - starts[r] != prompt_len:
                raise ServingError(
                    f"request {rid}: its prompt ({prompt_len} tokens) did not arrive whole "
                    f"({starts[r + 1] - starts[r]} tokens after {state.num_computed_tokens}); a route is "
                    "decided on the whole prompt: serve with --no-enable-chunked-prefill and "
                    "--no-enable-prefix-caching, max_num_batched_tokens >= max_model_len"
                )
            self.routes[rid] = {}
            new.append(True)
            controls.append(_request_routing(rid, state.sampling_params))
        self._ctx, self._step = ctx, Step(req_ids, starts, new, controls)
        self._slices = {}
        return self._step

    def sliced(
        self, meta: Any, kept: list[int], attn: nn.Module, dtype: torch.dtype
    ) -> tuple[Any, torch.Tensor]:
        """``slice_attention_metadata`` for the current pass, computed once per kept set."""
        key = (id(meta), tuple(kept), attn.impl.sliding_window, attn.impl.num_heads)
        if key not in self._slices:
            self._slices[key] = slice_attention_metadata(meta, self._step.starts, kept, attn, dtype)
        return self._slices[key]


@dataclasses.dataclass
class Step:
    req_ids: list[str]
    starts: list[int]  # query_start_loc on the host: request r's tokens are starts[r]:starts[r + 1]
    new: list[bool]  # the request's route is decided in this step (its prompt is here)
    controls: list[RequestRouting | None]  # for new requests only


def _request_routing(rid: str, sampling_params: Any) -> RequestRouting:
    try:
        return parse_request_routing(getattr(sampling_params, "extra_args", None))
    except RequestArgumentError as err:
        # The frontend (routertune's middleware, sampling_params()) refuses these before they reach
        # the engine; a request that bypassed it is served with its router files' routes.
        logger.warning("request %s: %s; using the router files' thresholds", rid, err)
        return RequestRouting()


class RoutedSelfAttention(nn.Module):
    """A routed layer's attention: vLLM's module as ``base_layer``, called for kept requests only."""

    def __init__(
        self, base_layer: nn.Module, layer_idx: int, book: RouteBook, model_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx = layer_idx
        self.book = book
        self.attn_name: str = base_layer.attn.layer_name
        self.model_dtype = model_dtype
        self.router_weight: torch.Tensor | None = None  # (1, hidden) float32, set by _attach
        # Tokens whose attention this layer computed (and whose KV it wrote) in real steps: what
        # the tests check skipping against, and what the benchmark reports.
        self.tokens_attended = 0
        self.op_seconds = 0.0
        self.attention_seconds = 0.0
        self.op_key = f"{book.model_number}:{self.attn_name}"
        _WRAPPERS[self.op_key] = self

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.routertune_vllm.routed_attention(positions, hidden_states, self.op_key)

    def run(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The op's body: decide (new requests), then attend for the kept requests only."""
        from vllm.forward_context import get_forward_context

        if self.book.runner is None:  # checked on vLLM's first (profiling) pass, before any request
            raise ServingError(
                "the routed model has no request identities: start vLLM with "
                "--worker-cls routertune.serving.vllm_worker.RoutedWorker (routertune serve does)"
            )
        ctx = get_forward_context()
        metas = ctx.attn_metadata
        meta = metas.get(self.attn_name) if isinstance(metas, dict) else None
        if meta is None:  # vLLM's profiling and warm-up passes carry no requests
            return self.base_layer(positions, hidden_states)
        start = time.perf_counter()
        try:
            return self._route(ctx, meta, positions, hidden_states)
        finally:
            self.op_seconds += time.perf_counter() - start

    def _attend(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.base_layer(positions, hidden_states)
        self.attention_seconds += time.perf_counter() - start
        return out

    def _route(
        self, ctx: Any, meta: Any, positions: torch.Tensor, hidden_states: torch.Tensor
    ) -> torch.Tensor:
        step = self.book.step(ctx, meta)
        keep = self._decide(step, hidden_states)
        if all(keep):
            self.tokens_attended += step.starts[-1]
            return self._attend(positions, hidden_states)
        out = torch.zeros_like(hidden_states)
        kept = [r for r, k in enumerate(keep) if k]
        if not kept:
            return out
        sub_meta, tokens = self.book.sliced(meta, kept, self.base_layer.attn, self.model_dtype)
        self.tokens_attended += int(tokens.numel())
        metas, slots = ctx.attn_metadata, ctx.slot_mapping
        full_slots = slots.get(self.attn_name)
        metas[self.attn_name] = sub_meta
        if full_slots is not None:
            slots[self.attn_name] = full_slots[tokens]
        try:
            out[tokens] = self._attend(positions[tokens], hidden_states[tokens])
        finally:
            metas[self.attn_name] = meta
            if full_slots is not None:
                slots[self.attn_name] = full_slots
        return out

    def _decide(self, step: Step, x: torch.Tensor) -> list[bool]:
        keep = []
        for r, rid in enumerate(step.req_ids):
            route = self.book.routes[rid]
            if not step.new[r]:
                keep.append(route[self.layer_idx])
                continue
            control = step.controls[r]
            if control.dense:
                decision = True
            else:
                threshold = (
                    control.threshold
                    if control.threshold is not None
                    else self.book.thresholds[self.layer_idx]
                )
                tokens = x[step.starts[r] : step.starts[r + 1]].float()
                # routertune's rule (router.py): sigmoid of the float32 score of the token mean.
                score = torch.sigmoid(
                    nn.functional.linear(tokens.mean(dim=0), self.router_weight).squeeze(-1)
                )
                decision = bool(score - threshold >= 0)
            route[self.layer_idx] = decision
            keep.append(decision)
        return keep


def slice_attention_metadata(
    meta: Any, starts: list[int], kept: list[int], attn: nn.Module, dtype: torch.dtype
) -> tuple[Any, torch.Tensor]:
    """The attention metadata of the requests ``kept`` alone, and their token indices.

    Only vLLM's CPU attention backend is sliced; another backend is refused by name.
    """
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    if not isinstance(meta, CPUAttentionMetadata):
        raise ServingError(
            f"routertune slices the attention metadata of vLLM's CPU backend; {type(meta).__name__} is not "
            "supported yet (a mixed batch cannot skip per request on it)"
        )
    if meta.dynamic_causal is not None or meta.use_sdpa_prefill or meta.encoder_cache is not None:
        raise ServingError(
            "routertune: CPU attention metadata with dynamic causality / SDPA prefill is not supported"
        )
    from vllm import _custom_ops as ops
    from vllm import envs

    device = meta.query_start_loc.device
    lengths = [starts[r + 1] - starts[r] for r in kept]
    tokens = torch.cat([torch.arange(starts[r], starts[r + 1], device=device) for r in kept])
    qsl = torch.zeros(len(kept) + 1, dtype=meta.query_start_loc.dtype, device=device)
    qsl[1:] = torch.tensor(lengths, dtype=qsl.dtype, device=device).cumsum(0)
    rows = torch.tensor(kept, device=device)
    seq_lens = meta.seq_lens[rows]
    impl = attn.impl
    scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(kept),
        num_heads=impl.num_heads,
        num_kv_heads=impl.num_kv_heads,
        head_dim=impl.head_size,
        seq_lens=seq_lens,
        dtype=dtype,
        query_start_loc=qsl,
        causal=meta.causal,
        sliding_window_size=impl.sliding_window,
        isa=attn.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        kv_cache_dtype=impl.kv_cache_dtype,
    )
    sub = dataclasses.replace(
        meta,
        num_actual_tokens=int(tokens.numel()),
        max_query_len=max(lengths),
        query_start_loc=qsl,
        max_seq_len=int(seq_lens.max()),
        seq_lens=seq_lens,
        block_table=meta.block_table[rows],
        slot_mapping=meta.slot_mapping[tokens],
        scheduler_metadata=scheduler_metadata,
    )
    return sub, tokens


def _routed_attention(positions: torch.Tensor, hidden_states: torch.Tensor, op_key: str) -> torch.Tensor:
    return _WRAPPERS[op_key].run(positions, hidden_states)


def _routed_attention_fake(positions: torch.Tensor, hidden_states: torch.Tensor, op_key: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


def _register_op() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    global _LIB
    if hasattr(torch.ops.routertune_vllm, "routed_attention"):
        return
    _LIB = torch.library.Library("routertune_vllm", "FRAGMENT")  # the op lives as long as this object
    direct_register_custom_op(
        op_name="routed_attention",
        op_func=_routed_attention,
        mutates_args=[],
        fake_impl=_routed_attention_fake,
        target_lib=_LIB,
    )


_LIB: Any = None
_register_op()


def _check_engine_config(vllm_config: Any) -> None:
    from vllm.platforms import current_platform

    problems = []
    if not current_platform.is_cpu():
        # A mixed step runs the attention on a slice of the batch's metadata, written for the CPU
        # backend only; other backends (and CUDA graphs around the op) are not done yet.
        problems.append(
            f"routed serving runs on vLLM's CPU backend only (this platform: {current_platform.device_name})"
        )
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append(
            "prefix caching is on (a cached block of a skipping request lacks KV in its skipped layers): --no-enable-prefix-caching"
        )
    if vllm_config.scheduler_config.enable_chunked_prefill:
        problems.append(
            "chunked prefill is on (a route is decided on the whole prompt): --no-enable-chunked-prefill"
        )
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        problems.append("pipeline parallelism is not supported")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is not supported")
    if problems:
        raise ServingError("routertune cannot serve this engine configuration: " + "; ".join(problems))


def _attach(model: nn.Module, vllm_config: Any) -> RouteBook:
    import vllm

    from routertune.serving.plugin import check_vllm_version

    check_vllm_version(vllm.__version__)
    _check_engine_config(vllm_config)
    hf_config = vllm_config.model_config.hf_config
    entry = getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(entry, dict) or "routers" not in entry:
        raise ServingError(
            f"{vllm_config.model_config.model}: config.json names a routertune architecture but has no "
            f"'{CONFIG_KEY}' entry; make the folder with routertune serve (serving.folder.prepare_served_folder)"
        )
    routers_dir = Path(vllm_config.model_config.model) / entry["routers"]
    meta, weights = load_router_folder(routers_dir, hf_config.to_dict())
    book = RouteBook(layer_thresholds(meta))
    layers = model.model.layers
    for i, w in weights.items():
        decoder = layers[i]
        wrapper = RoutedSelfAttention(decoder.self_attn, i, book, vllm_config.model_config.dtype)
        wrapper.router_weight = w
        decoder.self_attn = wrapper
    model._routertune_routed_layers = sorted(weights)
    logger.info("routertune: attn_sequence routers on layers %s (from %s)", sorted(weights), routers_dir)
    return book


def _wrapped_names(routed_layers: Iterable[int]) -> re.Pattern[str]:
    joined = "|".join(str(i) for i in sorted(routed_layers))
    return re.compile(rf"^((?:.*\.)?layers\.(?:{joined})\.self_attn\.)")


def _routed_class(hf_architecture: str) -> type:
    module_name, class_name = VLLM_FAMILIES[hf_architecture]
    base = getattr(importlib.import_module(module_name), class_name)

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self.routertune_routes = _attach(self, vllm_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The checkpoint names a routed layer's attention "...self_attn.x"; it now lives in
        # "...self_attn.base_layer.x".
        pattern = _wrapped_names(self._routertune_routed_layers)
        renamed = ((pattern.sub(r"\1base_layer.", name), w) for name, w in weights)
        loaded = base.load_weights(self, renamed)
        device = next(self.parameters()).device
        for layer in self.model.layers:
            if isinstance(layer.self_attn, RoutedSelfAttention):
                layer.self_attn.router_weight = layer.self_attn.router_weight.to(device)
        return loaded

    name = routed_architecture(hf_architecture)
    return type(name, (base,), {"__init__": __init__, "load_weights": load_weights, "__module__": __name__})


def __getattr__(name: str) -> type:
    # vLLM's registry imports "routertune.serving.vllm_model:RoutertuneLlamaForCausalLM".
    for arch in VLLM_FAMILIES:
        if name == routed_architecture(arch):
            cls = _routed_class(arch)
            globals()[name] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def route_book_of(model: nn.Module) -> RouteBook | None:
    return getattr(model, "routertune_routes", None)

"""Attach and detach routers, find them again, set their thresholds.

Routers are an adapter: ``attach_routers`` changes a model in place (PEFT-like), wrapping the
sub-layers of the routed layers (:mod:`routertune.routing.layers`); ``detach_routers`` puts the
original modules back. Saving and loading: :mod:`routertune.routing.router_files`; observing
decisions: :mod:`routertune.routing.observe`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from routertune.routing.arch import (
    CACHE_KWARGS,
    UnsupportedArchitectureError,
    arch_spec,
    base_model,
    decoder_layers,
    mask_anchor_layers,
)
from routertune.routing.compiled import ensure_cache_registered
from routertune.routing.config import RouterConfig, RouterConfigError
from routertune.routing.layers import (
    ROUTING_MASK_KWARG,
    TOKEN_MASK_KWARG,
    BranchGate,
    LayerRouting,
    RoutedAttention,
    RoutedMLP,
    SubLayerWrapper,
    strip_routing_kwargs,
)
from routertune.routing.probe import capture_layer_calls, probe_routed_layers
from routertune.routing.router import Router

_CONFIG_ATTR = "routertune_config"
_HOOK_ATTR = "_routertune_hooks"
# Forward keyword of a routed model: (B, T) mask of the tokens each sequence router decides on,
# e.g. ``model(input_ids, attention_mask=..., routing_mask=prompt_mask)`` routes a prompt +
# answer sequence on its prompt alone, as generation does. Ignored by token routers.
ROUTING_MASK_ARG = "routing_mask"

__all__ = [
    "ROUTING_MASK_ARG",
    "all_units_kept",
    "attach_routers",
    "capacity_regularizer",
    "detach_routers",
    "forced_routes",
    "get_router_config",
    "plain_parameter_names",
    "require_config",
    "routed_layers",
    "router_parameters",
    "set_thresholds",
]


# --------------------------------------------------------------------------------------------
# attach / detach
# --------------------------------------------------------------------------------------------
def attach_routers(
    model: nn.Module, config: RouterConfig | None = None, probe: bool | None = None
) -> nn.Module:
    """Adds zero-initialised routers to ``model`` in place and returns it.

    The attention (and, for ``mlp_*`` / ``block_*``, the MLP) of every routed layer is wrapped
    (:mod:`routertune.routing.layers`); the decoder layers themselves are left as they are. Nothing is
    frozen here (training code freezes by structure, see :func:`router_parameters`).

    Args:
        probe: run the attach-time check (:func:`routertune.routing.probe.probe_routed_layers`): each
            routed layer class must equal the plain layer with routers on, and the layer with
            the routed sub-layer's output zeroed when skipping; refuses the model otherwise.
            A few milliseconds on small models (docs/design.md). None (default): probe when the
            weights are in this process; a model whose weights are not (meta device, ZeRO-3
            partitioned at load) is attached without the probe if its family is in the table
            (:data:`routertune.routing.arch.ARCHITECTURES`, each tested exact), else refused.

    Raises:
        UnsupportedArchitectureError: a family that cannot be routed exactly, named.
        RouterConfigError: the config asks for layers the model cannot route.
    """
    config = config or RouterConfig()
    if get_router_config(model) is not None:
        raise RouterConfigError("this model already has routers; call detach_routers(model) first")
    spec = arch_spec(model)
    layers = decoder_layers(model)
    num_layers = len(layers)
    indices = config.routed_layer_indices(num_layers)
    if config.target in ("attn", "block"):
        anchors = mask_anchor_layers(model)
        clash = sorted(set(indices) & anchors)
        if clash and config.layers is not None:
            raise RouterConfigError(
                f"layers {clash} size the attention masks of the KV cache and must always run attention; "
                "they cannot be routed"
            )
        indices = [i for i in indices if i not in anchors]
    if not indices:
        raise RouterConfigError(f"no layer to route in a model with {num_layers} layers (config: {config})")
    probe = _should_probe(model, spec, probe)
    calls = capture_layer_calls(model, spec, indices, config.parts, config.unit) if probe else None
    hidden = model.config.hidden_size
    routings, handles = [], []
    for idx, layer in enumerate(layers):
        if idx in indices:
            routings.append(_wrap_layer(layer, idx, config, spec, hidden))
        else:
            handles.append(layer.register_forward_pre_hook(strip_routing_kwargs, with_kwargs=True))
    hook = functools.partial(_pass_token_mask, routings)
    handles.append(base_model(model).register_forward_pre_hook(hook, with_kwargs=True))
    # On the model itself as well: `model.forward = torch.compile(model.forward)` leaves the
    # hooks of `model` eager, so a new request's cache is registered before the graph runs.
    handles.append(model.register_forward_pre_hook(_register_request_cache, with_kwargs=True))
    setattr(model, _CONFIG_ATTR, config)
    setattr(model, _HOOK_ATTR, handles)
    if calls is not None:
        try:
            probe_routed_layers(model, calls, {r.layer_idx: r for r in routings})
        except BaseException:
            detach_routers(model)
            raise
    return model


def weights_materialized(model: nn.Module) -> bool:
    """False when some weights are not in this process: on the meta device, or partitioned by
    DeepSpeed ZeRO-3 (``zero3_init_flag``: each process holds a slice, ``ds_tensor``)."""
    return not any(p.is_meta or hasattr(p, "ds_tensor") for p in model.parameters())


def _should_probe(model: nn.Module, spec, probe: bool | None) -> bool:
    if probe is False:
        return False
    if weights_materialized(model):
        return True
    if probe is None and spec.known:
        return False  # a family of the table: tested exact, no forward needed here
    raise UnsupportedArchitectureError(
        f"{type(decoder_layers(model)[0]).__name__} ({spec.name}) "
        + ("is not in routertune's family table, and " if not spec.known else "")
        + "the attach-time probe needs the model's weights, which are not in this process (meta device, "
        "or partitioned by ZeRO-3 at load); attach routers to a loaded copy once to check the family "
        "(e.g. one process without zero3_init_flag), then pass probe=False"
    )


def _wrap_layer(layer: nn.Module, idx: int, config: RouterConfig, spec, hidden: int) -> LayerRouting:
    routing = LayerRouting(idx, config.target, config.unit, spec)
    attention = getattr(layer, spec.attention)
    router = Router(hidden, config.threshold_for(idx)).to(_device_of(attention))
    setattr(layer, spec.attention, RoutedAttention(attention, routing, router, routes="attn" in config.parts))
    if "mlp" in config.parts:
        setattr(layer, spec.mlp, RoutedMLP(getattr(layer, spec.mlp), routing))
    for part in config.parts:
        if part in spec.branch_end:
            name = spec.branch_end[part]
            setattr(layer, name, BranchGate(getattr(layer, name), routing))
    return routing


def plain_parameter_names(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the names the model has without routers (for files other tools load).

    A wrapped sub-layer keeps the original as ``base_layer``, so its weights are named
    ``...self_attn.base_layer.q_proj.weight`` while routers are attached; this maps them back to
    ``...self_attn.q_proj.weight`` (also inside longer names, e.g. a PEFT adapter's). Router
    weights keep their names (they have no plain counterpart).
    """
    wrappers = [name for name, m in model.named_modules() if isinstance(m, SubLayerWrapper)]
    out = {}
    for key, value in state.items():
        for name in wrappers:
            key = key.replace(f"{name}.base_layer.", f"{name}.")
        out[key] = value
    return out


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def detach_routers(model: nn.Module) -> nn.Module:
    """Removes routers and restores the original sub-layer modules (in place)."""
    if get_router_config(model) is None:
        return model
    for layer in decoder_layers(model):
        for name, child in list(layer.named_children()):
            if isinstance(child, SubLayerWrapper):
                setattr(layer, name, child.base_layer)
    for handle in getattr(model, _HOOK_ATTR):
        handle.remove()
    delattr(model, _HOOK_ATTR)
    delattr(model, _CONFIG_ATTR)
    return model


def _register_request_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    if cache is not None:
        ensure_cache_registered(cache)


def _pass_token_mask(
    routings: list[LayerRouting], module: nn.Module, args: tuple, kwargs: dict
) -> tuple[tuple, dict]:
    """Forwards the 2-D padding mask to every decoder layer (sequence means skip padding).

    It travels as a keyword argument, not as module state, so gradient checkpointing's
    recomputation sees it too and concurrent requests cannot see each other's. Each routed layer
    is told that a mask was sent, so a family that drops it on the way is refused.
    """
    cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    if cache is not None:
        ensure_cache_registered(cache)  # so the compiled ops can find it (routing/compiled.py)
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    if isinstance(mask, dict):  # one 4-D mask per attention type (full, sliding): same padding
        mask = next((m for m in mask.values() if isinstance(m, torch.Tensor)), None)
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        # A one-token step is a generated token, never padding: nothing to read back (and a
        # compiled decode step then carries no mask arithmetic of routertune's).
        mask = None if _input_length(args, kwargs) == 1 else _padding_of_4d_mask(mask, args, kwargs)
    sent = isinstance(mask, torch.Tensor) and mask.dim() == 2
    if sent:
        kwargs[TOKEN_MASK_KWARG] = mask
    for layer_routing in routings:
        layer_routing.mask_sent = sent
    routing = kwargs.pop(ROUTING_MASK_ARG, None)
    if routing is not None:
        if not isinstance(routing, torch.Tensor) or routing.dim() != 2:
            raise ValueError(f"{ROUTING_MASK_ARG} must be a 2-D (batch, tokens) tensor")
        kwargs[ROUTING_MASK_KWARG] = routing
    return args, kwargs


def _input_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    return ids if isinstance(ids, torch.Tensor) else None


def _input_length(args: tuple, kwargs: dict) -> int | None:
    ids = _input_ids(args, kwargs)
    return int(ids.shape[1]) if ids is not None and ids.dim() >= 2 else None


def _padding_of_4d_mask(mask: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The (B, T) padding mask of the current tokens, read back from a 4-D attention mask.

    generate() on a static cache builds the (B, 1, T, S) mask itself and passes no 2-D one. A
    padding key is masked for every query while a real token is visible at least to itself, so
    a key slot is real iff some query may attend it; the current tokens fill the slots after the
    ones the cache already holds. None when the input length cannot be read.
    """
    ids = _input_ids(args, kwargs)
    if ids is None:
        return None
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    slots = allowed.any(dim=2).any(dim=1)  # (B, S)
    cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    length = ids.shape[1]
    if past + length > slots.shape[1]:
        return None
    return slots[:, past : past + length].long()


# --------------------------------------------------------------------------------------------
# queries
# --------------------------------------------------------------------------------------------
def get_router_config(model: nn.Module) -> RouterConfig | None:
    return getattr(model, _CONFIG_ATTR, None)


def routed_layers(model: nn.Module) -> dict[int, RoutedAttention]:
    """Layer index -> the routing module of each routed layer (its ``.router``, its ``.routing``:
    the wrapped attention, where every target's decision is made)."""
    if get_router_config(model) is None:
        return {}
    return {
        i: child
        for i, layer in enumerate(decoder_layers(model))
        for child in layer.children()
        if isinstance(child, RoutedAttention)
    }


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Exactly the router weights, found by structure (the Router modules), in layer order."""
    return [p for layer in routed_layers(model).values() for p in layer.router.parameters()]


def set_thresholds(model: nn.Module, thresholds: float | dict[int, float]) -> None:
    """Sets keep thresholds (all routed layers, or per layer) and records them in the config."""
    config = require_config(model)
    layers = routed_layers(model)
    if isinstance(thresholds, dict):
        _require_routed(layers, thresholds)
        merged = dict(config.layer_thresholds or {})
        merged.update({int(k): float(v) for k, v in thresholds.items()})
    else:
        merged = {i: float(thresholds) for i in layers}
    checked = RouterConfig.from_dict({**config.to_dict(), "layer_thresholds": merged})
    config.layer_thresholds = checked.layer_thresholds
    for idx, layer in layers.items():
        layer.router.threshold = config.threshold_for(idx)


@contextlib.contextmanager
def all_units_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily runs every routed unit (threshold 0): the dense model, same weights.

    Useful as a teacher for distillation and as the dense baseline in one process. The saved
    config and thresholds are untouched.
    """
    layers = routed_layers(model)
    saved = {i: layer.router.threshold for i, layer in layers.items()}
    for layer in layers.values():
        layer.router.threshold = 0.0
    try:
        yield model
    finally:
        for i, layer in layers.items():
            layer.router.threshold = saved[i]


@contextlib.contextmanager
def forced_routes(model: nn.Module, keep: dict[int, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily replaces the routers' decisions in the given layers by ``keep``.

    ``keep`` maps routed layer index -> bool tensor: ``(B,)`` for ``*_sequence`` routers (one
    decision per row of the batch), ``(B, T)`` for ``*_token`` ones. The forward then skips
    exactly those units, with the same code as a router's decision (skipped rows are not
    computed). Layers not named decide as usual. For analysis: the per-example oracle of
    ``benchmarks/headroom.py``, hand-made routes. Not for training (no gate gradient).
    """
    unit = require_config(model).unit
    layers = routed_layers(model)
    _require_routed(layers, keep)
    for idx, value in keep.items():
        if value.dtype != torch.bool or value.dim() != (1 if unit == "sequence" else 2):
            raise RouterConfigError(
                f"layer {idx}: a forced {unit} route is a bool tensor of shape "
                f"{'(batch,)' if unit == 'sequence' else '(batch, tokens)'}; "
                f"got {value.dtype} {tuple(value.shape)}"
            )
    for idx, value in keep.items():
        layers[idx].routing.forced_keep = value
    try:
        yield model
    finally:
        for idx in keep:
            layers[idx].routing.forced_keep = None


def _require_routed(layers: dict[int, Any], indices: Any) -> None:
    """RouterConfigError naming the ``indices`` that are not among the routed ``layers``."""
    unknown = sorted(set(indices) - set(layers))
    if unknown:
        raise RouterConfigError(f"layers {unknown} have no router (routed layers: {sorted(layers)})")


def require_config(model: nn.Module) -> RouterConfig:
    """The model's router config; RouterConfigError when it has no routers."""
    config = get_router_config(model)
    if config is None:
        raise RouterConfigError("this model has no routers; call attach_routers or load_routers first")
    return config


# --------------------------------------------------------------------------------------------
# training signal
# --------------------------------------------------------------------------------------------
def capacity_regularizer(model: nn.Module) -> torch.Tensor | None:
    """``gradient_scale * sum_l relu(capacity_l - target_capacity)`` of the latest training forward.

    capacity_l is the straight-through share of units kept by layer l (forward value: the hard
    share), so the gradient reaches the router scores. None when not configured.
    """
    config = get_router_config(model)
    if config is None or config.gradient_scale == 0 or config.target_capacity is None:
        return None
    caps = [
        layer.routing.last_capacity
        for layer in routed_layers(model).values()
        if layer.routing.last_capacity is not None
    ]
    if not caps:
        return None
    excess = torch.relu(torch.stack(caps) - config.target_capacity)
    return config.gradient_scale * excess.sum()

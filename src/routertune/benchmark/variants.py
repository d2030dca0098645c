"""The variants one model object is timed in: dense, all kept, routed, sub-layers deleted.

Every variant is a context manager over the same model object, so the weights, the allocator
and the caches are shared and only the routing differs between timed runs.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from routertune.benchmark.settings import VARIANTS, BenchError
from routertune.routing.arch import arch_spec, decoder_layers
from routertune.routing.attach import (
    all_units_kept,
    attach_routers,
    detach_routers,
    get_router_config,
    routed_layers,
    set_thresholds,
)
from routertune.routing.config import RouterConfig
from routertune.routing.router import KEEP_ALL_THRESHOLD, SKIP_ALL_THRESHOLD


def forced_skip_layers(routed: Sequence[int], ratio: float) -> list[int]:
    """The deepest ``round(ratio * len(routed))`` routed layers (rounding halves up).

    Deepest first because trained attention routers mostly skip deep layers, and deep attention
    layers are the most redundant ones (He et al., "What matters in transformers?").
    """
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise BenchError(f"skip_ratio must be in [0, 1]; got {ratio}")
    count = math.floor(ratio * len(routed) + 0.5)
    return sorted(routed)[len(routed) - count :] if count else []


def force_skip(model: nn.Module, ratio: float) -> list[int]:
    """Sets per-layer thresholds: the chosen layers skip every unit, the others keep all."""
    layers = sorted(routed_layers(model))
    skip = forced_skip_layers(layers, ratio)
    set_thresholds(model, {i: (SKIP_ALL_THRESHOLD if i in skip else KEEP_ALL_THRESHOLD) for i in layers})
    return skip


class ZeroAttention(nn.Module):
    """A deleted attention sub-layer: adds nothing and stores no KV."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class ZeroMLP(nn.Module):
    """A deleted MLP sub-layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


@contextlib.contextmanager
def routers_detached(model: nn.Module) -> Iterator[nn.Module]:
    """The plain model for the duration of the block; routers (weights, thresholds) come back after."""
    config = get_router_config(model)
    layers = routed_layers(model)
    weights = {i: layer.router.proj.weight.detach().clone() for i, layer in layers.items()}
    thresholds = {i: layer.router.threshold for i, layer in layers.items()}
    snapshot = RouterConfig.from_dict({**config.to_dict(), "layers": sorted(layers)})
    detach_routers(model)
    try:
        yield model
    finally:
        attach_routers(model, snapshot, probe=False)  # the same layers passed the probe when first attached
        with torch.no_grad():
            for i, layer in routed_layers(model).items():
                layer.router.proj.weight.copy_(weights[i])
                layer.router.threshold = thresholds[i]


def delete_sublayers(
    plain: nn.Module, layers: Sequence[int], target: str
) -> dict[tuple[int, str], nn.Module]:
    """Replaces the ``target`` sub-layers of ``layers`` in the plain model (in place) by modules
    that add nothing and store no KV; returns the removed modules by (layer, attribute name)."""
    spec = arch_spec(plain)  # the family's own module names (self_attn, attention, ...)
    names = {"attn": [spec.attention], "mlp": [spec.mlp], "block": [spec.attention, spec.mlp]}[target]
    zeros = {spec.attention: ZeroAttention, spec.mlp: ZeroMLP}
    saved: dict[tuple[int, str], nn.Module] = {}
    blocks = decoder_layers(plain)
    for i in layers:
        for name in names:
            saved[i, name] = getattr(blocks[i], name)
            setattr(blocks[i], name, zeros[name]())
    return saved


def deleted_copy(plain: nn.Module, layers: Sequence[int], target: str) -> nn.Module:
    """A copy of the plain model with the ``target`` sub-layers of ``layers`` deleted."""
    model = copy.deepcopy(plain)
    delete_sublayers(model, layers, target)
    return model


@contextlib.contextmanager
def sublayers_deleted(model: nn.Module, layers: Sequence[int], target: str) -> Iterator[nn.Module]:
    """The plain model with the ``target`` sub-layers of ``layers`` deleted, for the block."""
    with routers_detached(model):
        saved = delete_sublayers(model, layers, target)
        blocks = decoder_layers(model)
        try:
            yield model
        finally:
            for (i, name), module in saved.items():
                setattr(blocks[i], name, module)


def variant(model: nn.Module, name: str, deleted: Sequence[int] = ()) -> contextlib.AbstractContextManager:
    """Context manager that puts ``model`` into one of ``VARIANTS`` for the block."""
    if name == "dense":
        return routers_detached(model)
    if name == "all_kept":
        return all_units_kept(model)
    if name == "routed":
        return contextlib.nullcontext(model)
    if name == "oracle":
        return sublayers_deleted(model, deleted, get_router_config(model).target)
    raise BenchError(f"unknown variant {name!r}; variants: {', '.join(VARIANTS)}")

"""Observe what routers decide: capacity kept, router scores, runs over data batches.

    with track_capacity(model) as stats:
        model.generate(...)
    stats.overall, stats.per_layer, stats.as_dict()

Observers are told every routed decision (:class:`routertune.routing.layers.LayerRouting`);
while one is attached, layers whose threshold fixes the decision still score their inputs, so
the scores are there to record. Capacity is the share of routed units kept: sequences (counted
once per request, at prefill) for ``*_sequence`` routers, non-padding tokens for ``*_token``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from routertune.routing.arch import base_model
from routertune.routing.attach import ROUTING_MASK_ARG, routed_layers
from routertune.routing.config import RouterConfigError

__all__ = [
    "CapacityStats",
    "ScoreRecorder",
    "capacity_summary",
    "measure_capacity",
    "overall_capacity",
    "router_probabilities",
    "run_batches",
    "track_capacity",
]


def overall_capacity(counts: dict[int, tuple[int, int]]) -> float:
    """Kept / total over every layer of ``{layer: (kept, total)}`` (NaN when nothing was seen)."""
    total = sum(t for _, t in counts.values())
    return sum(k for k, _ in counts.values()) / total if total else float("nan")


def capacity_summary(counts: dict[int, tuple[int, int]]) -> dict[str, Any]:
    """The JSON record of ``{layer: (kept, total)}``: ``{"overall", "per_layer", "counts"}``.

    Shares are None where no unit was seen. Every capacity in routertune's reports has this shape.
    """
    return {
        "overall": _json_float(overall_capacity(counts)),
        "per_layer": {str(i): (k / t if t else None) for i, (k, t) in counts.items()},
        "counts": {str(i): {"kept": k, "total": t} for i, (k, t) in counts.items()},
    }


class CapacityStats:
    """Share of routed units kept, per layer and overall, over the forwards it observed.

    Units are sequences (``*_sequence``; counted once per request, at prefill) or non-padding
    tokens (``*_token``). Counts stay on the device until read.
    """

    def __init__(self) -> None:
        self._kept: dict[int, torch.Tensor] = {}
        self._total: dict[int, torch.Tensor] = {}

    def observe(self, layer_idx: int, keep: torch.Tensor, scores: Any, valid: torch.Tensor | None) -> None:
        keep = keep.detach()
        if valid is not None:
            kept, total = (keep & valid).sum(), valid.sum()
        else:
            kept, total = keep.sum(), torch.tensor(keep.numel(), device=keep.device)
        self._kept[layer_idx] = self._kept.get(layer_idx, 0) + kept
        self._total[layer_idx] = self._total.get(layer_idx, 0) + total

    @property
    def counts(self) -> dict[int, tuple[int, int]]:
        return {i: (int(self._kept[i]), int(self._total[i])) for i in sorted(self._kept)}

    @property
    def per_layer(self) -> dict[int, float]:
        return {i: (k / t if t else float("nan")) for i, (k, t) in self.counts.items()}

    @property
    def overall(self) -> float:
        """Share kept over all routed layers (NaN before any unit was seen)."""
        return overall_capacity(self.counts)

    def as_dict(self) -> dict[str, Any]:
        return capacity_summary(self.counts)


class ScoreRecorder:
    """Router scores per layer (CPU float32), for calibrating thresholds."""

    def __init__(self) -> None:
        self.scores: dict[int, list[torch.Tensor]] = {}

    def observe(self, layer_idx: int, keep: torch.Tensor, scores: Any, valid: torch.Tensor | None) -> None:
        if scores is None:
            return
        s = scores.detach()
        if valid is not None:
            s = s[valid]
        self.scores.setdefault(layer_idx, []).append(s.float().reshape(-1).cpu())

    def per_layer(self) -> dict[int, torch.Tensor]:
        return {i: torch.cat(v) for i, v in sorted(self.scores.items())}


@contextlib.contextmanager
def _observing(model: nn.Module, observer: Any) -> Iterator[Any]:
    layers = routed_layers(model)
    if not layers:
        raise RouterConfigError("this model has no routers to observe")
    for layer in layers.values():
        layer.routing.observers.append(observer)
    try:
        yield observer
    finally:
        for layer in layers.values():
            layer.routing.observers.remove(observer)


def track_capacity(model: nn.Module) -> contextlib.AbstractContextManager[CapacityStats]:
    """``with track_capacity(model) as stats:`` counts what the routers keep during the block."""
    return _observing(model, CapacityStats())


def router_probabilities(model: nn.Module) -> contextlib.AbstractContextManager[ScoreRecorder]:
    """``with router_probabilities(model) as rec:`` records router scores (``rec.per_layer()``).

    Scores are recorded for every routed decision, including thresholds that fix the decision.
    """
    return _observing(model, ScoreRecorder())




def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else x


def run_batches(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """Runs the decoder stack (not the LM head: only layer decisions matter) over ``batches``.

    Eval mode and no grad, so routed layers really skip; no KV cache, so every forward decides
    afresh. A batch's ``routing_mask`` (see :func:`routertune.data.batches.make_batches`) is
    passed on. The model's train/eval mode is restored afterwards.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                extra = {}
                if "routing_mask" in batch:
                    extra[ROUTING_MASK_ARG] = batch["routing_mask"].to(device)
                base_model(model)(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                    **extra,
                )
    finally:
        model.train(was_training)


def measure_capacity(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Capacity the routed model keeps on ``batches`` (:func:`capacity_summary`).

    Raises:
        ValueError: no batch.
    """
    if not batches:
        raise ValueError("no batches to measure capacity on")
    with track_capacity(model) as stats:
        run_batches(model, batches)
    return stats.as_dict()

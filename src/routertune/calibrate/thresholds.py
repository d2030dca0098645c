"""Thresholds for a target capacity: the ``per_layer`` and ``global`` searches of the package doc."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routertune.calibrate.data import CalibrationError
from routertune.routing.router import KEEP_ALL_THRESHOLD, SKIP_ALL_THRESHOLD

if TYPE_CHECKING:
    import torch
    from torch import nn

CALIBRATION_METHODS = ("global", "per_layer")
CALIBRATION_REPORT = "calibration.json"


# --------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------
def kept_target(capacity: float, units: int) -> int:
    """Units to keep out of ``units`` for share ``capacity`` (rounded half up)."""
    return int(math.floor(capacity * units + 0.5))


def threshold_for_count(scores: torch.Tensor, k: int) -> float:
    """A threshold under which (about) ``k`` of ``scores`` are kept (``score - t >= 0``).

    Halfway between the k-th and (k+1)-th highest score; with ties there, whichever of the two
    tie-breaking thresholds keeps a count closer to ``k``. ``k == 0`` skips all, ``k == n`` keeps
    all (thresholds 2 and 0: the routed layer then decides without scoring).

    Args:
        scores: ``(n,)`` router scores in (0, 1).
        k: units to keep, ``0 <= k <= n``.
    """
    import torch

    n = scores.numel()
    if not 0 <= k <= n:
        raise CalibrationError(f"cannot keep {k} of {n} units")
    if k == 0:
        return SKIP_ALL_THRESHOLD
    if k == n:
        return KEEP_ALL_THRESHOLD
    s = torch.sort(scores.double().reshape(-1), descending=True).values
    hi, lo = float(s[k - 1]), float(s[k])
    if hi > lo:
        t = (hi + lo) / 2
        # Decisions are made in float32: make sure the rounded threshold still separates them.
        if float(torch.tensor(t, dtype=torch.float32)) <= lo:
            t = hi
        return t
    # Tie across the cut: keep all tied scores, or none of them, whichever is closer to k.
    keep_ties = int((s >= hi).sum())
    above = int((s > hi).sum())
    if keep_ties - k <= k - above:
        return hi
    if above == 0:
        return (hi + 1.0) / 2 if hi < 1.0 else SKIP_ALL_THRESHOLD
    return (float(s[above - 1]) + hi) / 2


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate_thresholds`.

    Attributes:
        method: ``per_layer`` or ``global``.
        target_capacity: requested share of routed units kept.
        thresholds: layer index -> keep threshold now set on the model.
        calibration: capacity on the calibration data under ``thresholds``
            (``CapacityStats.as_dict()``: overall, per_layer, counts).
        passes: forward passes over the calibration data.
        converged: whether the kept count is within tolerance of the target.
        heldout: capacity on held-out data, when measured (see :func:`routertune.routing.observe.measure_capacity`).
        history: per pass, the thresholds tried and the overall capacity they kept.
    """

    method: str
    target_capacity: float
    thresholds: dict[int, float]
    calibration: dict[str, Any]
    passes: int
    converged: bool
    heldout: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target_capacity": self.target_capacity,
            "thresholds": {str(k): v for k, v in sorted(self.thresholds.items())},
            "calibration": self.calibration,
            "heldout": self.heldout,
            "passes": self.passes,
            "converged": self.converged,
            "history": self.history,
        }


def _check_capacity(target_capacity: Any) -> float:
    if isinstance(target_capacity, bool):
        raise CalibrationError(f"target capacity must be a number in [0, 1]; got {target_capacity!r}")
    try:
        c = float(target_capacity)
    except (TypeError, ValueError):
        raise CalibrationError(
            f"target capacity must be a number in [0, 1]; got {target_capacity!r}"
        ) from None
    if not math.isfinite(c) or not 0.0 <= c <= 1.0:
        raise CalibrationError(f"target capacity must be in [0, 1]; got {target_capacity!r}")
    return c


class _StopForward(Exception):
    """Raised by a calibration hook once the layer being calibrated has scored its inputs."""


def _record_pass(
    model: nn.Module, batches: list
) -> tuple[dict[int, tuple[int, int]], dict[int, torch.Tensor]]:
    """One pass under the current thresholds: (kept, total) per layer and the scores made."""
    from routertune.routing.observe import router_probabilities, run_batches, track_capacity

    with track_capacity(model) as stats, router_probabilities(model) as recorder:
        run_batches(model, batches)
    return stats.counts, recorder.per_layer()


def _current_thresholds(model: nn.Module) -> dict[int, float]:
    from routertune.routing.attach import routed_layers

    return {i: float(layer.router.threshold) for i, layer in routed_layers(model).items()}


def calibrate_thresholds(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    target_capacity: float,
    method: str = "global",
    max_passes: int = 12,
    tolerance: float = 0.005,
) -> CalibrationResult:
    """Sets keep thresholds so that the routed model keeps ``target_capacity`` of its routed units.

    ``per_layer`` decides the layers in order, each from the scores it makes while every layer
    before it already runs with its final threshold, so each layer keeps its share exactly
    (up to tied scores). With one batch this is a single forward pass: each router's
    threshold is set the moment it has scored the whole calibration set, before its layer
    acts. With several batches it takes one pass per routed layer, each stopped right after
    that layer's router, plus one pass to measure.

    ``global`` searches one threshold for all layers: each pass measures the current one and
    proposes the pooled-score quantile, bisecting inside the bracket of thresholds known to
    keep too much and too little, until the overall kept count is within tolerance.

    The thresholds are set on the model and recorded in its router config (``save_routers``
    writes them). When the target is missed, the closest thresholds found are kept and a
    warning says by how much.

    Args:
        model: a model with routers attached (``load_routers`` / ``attach_routers``).
        batches: calibration batches from :func:`make_batches` (a single batch is fastest).
        target_capacity: share of routed units to keep, in [0, 1].
        method: ``per_layer`` or ``global``.
        max_passes: most forward passes over ``batches`` for ``global``.
        tolerance: ``global`` stops when the kept count is within ``max(1, tolerance * units)``
            units of the target.

    Raises:
        CalibrationError: bad capacity or method, empty batches, or no routers.
    """
    from routertune.routing.attach import get_router_config, set_thresholds
    from routertune.routing.observe import capacity_summary, overall_capacity, run_batches, track_capacity

    capacity = _check_capacity(target_capacity)
    if method not in CALIBRATION_METHODS:
        raise CalibrationError(f"method must be one of {', '.join(CALIBRATION_METHODS)}; got {method!r}")
    if not batches:
        raise CalibrationError("the calibration set is empty")
    if get_router_config(model) is None:
        raise CalibrationError("this model has no routers to calibrate; load routers first")
    if max_passes < 1:
        raise CalibrationError(f"max_passes must be >= 1; got {max_passes}")

    if capacity in (0.0, 1.0):
        # Nothing to estimate: keep all (the dense model) or skip all.
        set_thresholds(model, KEEP_ALL_THRESHOLD if capacity == 1.0 else SKIP_ALL_THRESHOLD)
        with track_capacity(model) as stats:
            run_batches(model, batches)
        return CalibrationResult(method, capacity, _current_thresholds(model), stats.as_dict(), 1, True)

    history: list[dict[str, Any]] = []
    if method == "per_layer":
        counts, passes = _calibrate_per_layer(model, batches, capacity)
        worst = max(abs(k - kept_target(capacity, t)) for k, t in counts.values())
        converged, miss = worst <= 1, f"up to {worst} units in a layer"
    else:
        counts, passes, converged, history = _calibrate_global(
            model, batches, capacity, max_passes, tolerance
        )
        kept, total = sum(k for k, _ in counts.values()), sum(t for _, t in counts.values())
        miss = f"{abs(kept - kept_target(capacity, total))} of {total} units"
    if not converged:
        warnings.warn(
            f"calibration did not reach capacity {capacity:g}: off by {miss} (tied router scores, e.g. of "
            f"untrained routers, cannot be split); kept the closest thresholds: capacity {overall_capacity(counts):.4f}",
            stacklevel=2,
        )
    return CalibrationResult(
        method=method,
        target_capacity=capacity,
        thresholds=_current_thresholds(model),
        calibration=capacity_summary(counts),
        passes=passes,
        converged=converged,
        history=history,
    )


def _calibrate_per_layer(
    model: nn.Module, batches: list, capacity: float
) -> tuple[dict[int, tuple[int, int]], int]:
    """Exact per-layer quantiles, layer after layer (see :func:`calibrate_thresholds`).

    Returns:
        ``({layer: (kept, total)}, passes)`` on the calibration data under the final thresholds.
    """
    import torch

    from routertune.routing.attach import routed_layers, set_thresholds
    from routertune.routing.observe import run_batches, track_capacity

    layers = routed_layers(model)
    single = len(batches) == 1
    groups = [sorted(layers)] if single else [[i] for i in sorted(layers)]
    current: dict[str, torch.Tensor] = {}  # padding mask of the batch being run
    passes = 0
    for group in groups:
        # A threshold inside (0, 1] makes each layer score its inputs instead of a fixed decision.
        set_thresholds(model, {i: 0.5 for i in group})
        collected: dict[int, list[torch.Tensor]] = {i: [] for i in group}

        def on_scores(router: nn.Module, scores: torch.Tensor, idx: int, collected: dict = collected) -> None:
            s = scores.detach().float()  # (B,) per sequence or (B, T) per token
            if s.dim() == 2:
                s = s[current["valid"].to(s.device)]  # padding tokens are never units
            s = s.reshape(-1).cpu()
            if single:  # the whole calibration set is here: decide before the layer acts
                router.threshold = threshold_for_count(s, kept_target(capacity, s.numel()))
                return
            collected[idx].append(s)
            raise _StopForward

        handles = [
            layers[i].router.register_forward_hook(lambda m, a, out, i=i: on_scores(m, out, i)) for i in group
        ]
        try:
            with track_capacity(model) as stats:
                for batch in batches:
                    current["valid"] = batch["attention_mask"].bool()
                    try:
                        run_batches(model, [batch])
                    except _StopForward:
                        pass
        finally:
            for handle in handles:
                handle.remove()
        passes += 1
        if single:  # record the thresholds in the config; that pass ran every layer with its final one
            set_thresholds(model, {i: float(layers[i].router.threshold) for i in group})
            return stats.counts, passes
        scores = {i: torch.cat(collected[i]) for i in group}
        set_thresholds(
            model, {i: threshold_for_count(s, kept_target(capacity, s.numel())) for i, s in scores.items()}
        )
    with track_capacity(model) as stats:
        run_batches(model, batches)
    return stats.counts, passes + 1


def _calibrate_global(
    model: nn.Module, batches: list, capacity: float, max_passes: int, tolerance: float
) -> tuple[dict[int, tuple[int, int]], int, bool, list[dict[str, Any]]]:
    """One threshold for all layers, searched over passes (see :func:`calibrate_thresholds`)."""
    from routertune.routing.attach import set_thresholds

    history: list[dict[str, Any]] = []
    best: tuple[int, dict[int, float], dict[int, tuple[int, int]]] | None = None
    bracket = [0.0, 1.0]  # thresholds known to keep too much / too little
    converged = False
    for _ in range(max_passes):
        thresholds = _current_thresholds(model)
        counts, scores = _record_pass(model, batches)
        kept, total = sum(k for k, _ in counts.values()), sum(t for _, t in counts.values())
        miss = abs(kept - kept_target(capacity, total))
        history.append({"thresholds": {str(k): v for k, v in thresholds.items()}, "capacity": kept / total})
        if best is None or miss < best[0]:
            best = (miss, thresholds, counts)
        if miss <= max(1, int(tolerance * total)):
            converged = True
            break
        set_thresholds(model, _global_step(thresholds, counts, scores, capacity, bracket))
    _, thresholds, counts = best
    set_thresholds(model, thresholds)
    return counts, len(history), converged, history


def _global_step(
    thresholds: dict[int, float],
    counts: dict[int, tuple[int, int]],
    scores: dict[int, torch.Tensor],
    capacity: float,
    bracket: list[float],
) -> float:
    """The next global threshold: the pooled-score quantile, kept inside the known bracket."""
    import torch

    current = next(iter(thresholds.values()))
    same = all(abs(t - current) < 1e-12 for t in thresholds.values())
    kept = sum(k for k, _ in counts.values())
    total = sum(t for _, t in counts.values())
    target = kept_target(capacity, total)
    if same and 0.0 < current <= 1.0:  # a measured global threshold narrows the bracket
        if kept > target:
            bracket[0] = max(bracket[0], current)
        elif kept < target:
            bracket[1] = min(bracket[1], current)
    pooled = torch.cat([s.reshape(-1) for s in scores.values()])
    proposal = threshold_for_count(pooled, kept_target(capacity, pooled.numel()))
    if not bracket[0] < proposal < bracket[1]:
        proposal = (bracket[0] + bracket[1]) / 2
    return proposal


def save_calibrated(model: nn.Module, output: str | Path, report: dict[str, Any]) -> Path:
    """Saves the routers with their new thresholds and ``calibration.json`` into ``output``.

    Each file is replaced atomically; other files already in ``output`` are left alone.
    """
    import json

    from routertune.io_utils import atomic_write_text
    from routertune.routing.router_files import save_routers

    output = Path(output)
    save_routers(model, output)
    atomic_write_text(output / CALIBRATION_REPORT, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return output

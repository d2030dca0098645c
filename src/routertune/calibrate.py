"""Calibrate router thresholds to a target capacity, without retraining.

    routertune calibrate --routers runs/rt --target_capacity 0.5

    from routertune.calibrate import calibration_split, make_batches, calibrate_thresholds
    fit, heldout = calibration_split("builtin", n=64, n_heldout=32)
    result = calibrate_thresholds(model, make_batches(tokenizer, fit), target_capacity=0.5)

A router keeps a unit (a sequence or a token of one layer) iff ``score - threshold >= 0``.
Calibration records the routers' scores on instruction examples and moves the thresholds to
score quantiles so that the routed model keeps the requested share of routed units:

* ``global`` (default): one threshold for all routed layers, the quantile ``1 - C`` of all
  scores pooled; layers whose routers score higher keep more, so compute moves between
  layers as the routers prefer. On SmolLM2 it gave a lower held-out loss than ``per_layer``
  at the same capacity (docs/baselines.md).
* ``per_layer``: every routed layer keeps the share ``C`` of its units; the threshold of
  layer ``l`` is the quantile ``1 - C`` of that layer's scores. Exact, and one forward pass.

Skipping a unit changes the hidden states every later layer sees, so the scores of layer
``l`` depend on the thresholds of the layers before it (and, for ``global``, of itself).

* ``per_layer`` is solved exactly, layer after layer: each layer's quantile is taken from
  the scores it makes while every earlier layer already runs with its final threshold. With
  the calibration set in one batch that is one forward pass (a hook sets each router's
  threshold the moment it has scored the batch, before its layer acts); with several
  batches, one pass per routed layer, each stopped right after that layer's router.
* ``global`` iterates: each pass runs the routed model (really skipping) under the current
  threshold and proposes the pooled-score quantile of what it saw, bisecting inside the
  bracket of thresholds known to keep too much and too little, until the kept count is
  within ``max(1, 0.5%)`` of the routed units.

A first version iterated ``per_layer`` the same way; on SmolLM2 with trained routers whose
scores sit within a few hundredths of each other, 8 passes did not settle (every upstream
change flips decisions downstream). docs/baselines.md has the measured comparison.

The data helpers here (``calibration_split``, ``make_batches``, ``run_batches``) are shared
with :mod:`routertune.baselines` and :mod:`routertune.analyze`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

CALIBRATION_METHODS = ("global", "per_layer")
# A threshold above 1 skips every unit of its layer (sigmoid scores never exceed 1); the routed
# layer then takes its no-scoring fast path.
SKIP_ALL_THRESHOLD = 2.0
KEEP_ALL_THRESHOLD = 0.0
CALIBRATION_REPORT = "calibration.json"
DEFAULT_N = 64  # calibration examples
DEFAULT_HELDOUT = 32  # held-out examples the achieved capacity is checked on


class CalibrationError(ValueError):
    """Invalid calibration inputs: capacity out of range, empty data, a model without routers."""


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def calibration_split(
    source: str | Path = "builtin", n: int = DEFAULT_N, n_heldout: int = DEFAULT_HELDOUT
) -> tuple[list, list]:
    """Instruction examples to calibrate on, and held-out ones to check the result on.

    ``builtin``: the last ``n`` examples of the built-in mix, and the ``n_heldout`` before them.
    Training takes the mix from its start (``--max_train_samples`` of 4,083), so the tail is
    not trained on unless a run uses nearly all of it. None of it is evaluation data.
    A jsonl file (or a folder with ``data.jsonl``): its first ``n`` examples, then the next
    ``n_heldout``.

    Returns:
        ``(fit, heldout)``: lists of unified-format examples; ``heldout`` may be shorter than
        ``n_heldout`` (or empty) when the file runs out.

    Raises:
        CalibrationError: ``n < 1``, ``n_heldout < 0``, or no example to calibrate on.
        FileNotFoundError, DataFormatError: from reading the file.
    """
    from routertune.data import builtin_messages, load_training_examples

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CalibrationError(f"the number of calibration examples must be >= 1; got {n!r}")
    if isinstance(n_heldout, bool) or not isinstance(n_heldout, int) or n_heldout < 0:
        raise CalibrationError(f"the number of held-out examples must be >= 0; got {n_heldout!r}")
    if str(source) == "builtin":
        examples = builtin_messages()
        if n + n_heldout > len(examples):
            raise CalibrationError(
                f"the builtin mix has {len(examples)} examples; asked for {n} + {n_heldout} held-out"
            )
        end = len(examples)
        return examples[end - n :], examples[end - n - n_heldout : end - n]
    examples = load_training_examples(source)
    if not examples:
        raise CalibrationError(f"calibration data {source} holds no example")
    return examples[:n], examples[n : n + n_heldout]


def _encode(tokenizer: Any, item: Any, max_length: int) -> tuple[list[int], list[int] | None] | None:
    """Token ids (and loss labels, for examples) of one text or unified-format example."""
    from routertune.data import encode_example, render_messages

    if isinstance(item, str):
        ids = list(tokenizer(item)["input_ids"])
        return (ids[:max_length], None) if ids else None
    if not isinstance(item, dict):
        raise CalibrationError(
            f"calibration item must be a text or an example dict; got {type(item).__name__}"
        )
    encoded = encode_example(item, tokenizer)
    if encoded is not None:
        return encoded["input_ids"][:max_length], encoded["labels"][:max_length]
    if "messages" not in item:
        return None
    # No assistant turn: nothing to score a loss on, but still a valid input to route.
    text, _, add_special = render_messages(item["messages"], tokenizer)
    ids = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
    return (ids[:max_length], None) if ids else None


def make_batches(
    tokenizer: Any, data: list, batch_size: int = 8, max_length: int = 512, route_on: str = "all"
) -> list[dict[str, torch.Tensor]]:
    """Tokenises texts or unified-format examples into left-padded batches.

    Examples are rendered as in training (chat template, whole conversation) and cut to
    ``max_length`` tokens; they are sorted by length so that batches carry little padding.
    Items that already are batches (dicts with ``input_ids``) are passed through.

    ``route_on="prompt"`` adds a ``routing_mask``: sequence routers then decide on each
    example's prompt (the tokens before its first answer token), as generation and
    ``routertune eval`` route, so the calibrated share is the share kept in use. Texts and
    examples without an answer are all prompt. Token routers ignore the mask.

    Returns:
        Dicts with ``input_ids`` ``(B, T)`` long, ``attention_mask`` ``(B, T)`` long (0 on
        padding), for examples ``labels`` ``(B, T)`` (-100 outside assistant turns) and, with
        ``route_on="prompt"``, ``routing_mask`` ``(B, T)`` long.

    Raises:
        CalibrationError: empty data, no item yields a token, or an unknown ``route_on``.
    """
    import torch

    from routertune.data.encode import ROUTE_ON, prompt_routing_mask

    if batch_size < 1 or max_length < 1:
        raise CalibrationError(f"batch_size and max_length must be >= 1; got {batch_size}, {max_length}")
    if route_on not in ROUTE_ON:
        raise CalibrationError(f"route_on must be one of {', '.join(ROUTE_ON)}; got {route_on!r}")
    if not data:
        raise CalibrationError("the calibration set is empty")
    if all(isinstance(item, dict) and "input_ids" in item for item in data):
        return list(data)
    encoded = [e for e in (_encode(tokenizer, item, max_length) for item in data) if e is not None]
    if not encoded:
        raise CalibrationError(f"none of the {len(data)} calibration items yields tokens")
    encoded.sort(key=lambda e: -len(e[0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        T = len(chunk[0][0])  # longest first
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        routing = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, (tokens, lab) in enumerate(chunk):
            n = len(tokens)
            ids[b, T - n :] = torch.tensor(tokens)
            mask[b, T - n :] = 1
            if lab is not None:
                labels[b, T - n :] = torch.tensor(lab)
            routing[b, T - n :] = torch.tensor(prompt_routing_mask(lab) if lab is not None else [1] * n)
        batch = {"input_ids": ids, "attention_mask": mask}
        if any(lab is not None for _, lab in chunk):
            batch["labels"] = labels
        if route_on == "prompt":
            batch["routing_mask"] = routing
        batches.append(batch)
    return batches


def run_batches(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """Runs the decoder stack (not the LM head: only layer decisions matter) over ``batches``.

    Eval mode and no grad, so routed layers really skip; no KV cache, so every forward decides
    afresh. A batch's ``routing_mask`` (see :func:`make_batches`) is passed on. The model's
    train/eval mode is restored afterwards.
    """
    import torch

    from routertune.routing.arch import base_model
    from routertune.routing.attach import ROUTING_MASK_ARG

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
        heldout: capacity on held-out data, when measured (see :func:`measure_capacity`).
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
    from routertune.routing.observe import router_probabilities, track_capacity

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
    from routertune.routing.observe import track_capacity

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
            f"untrained routers, cannot be split); kept the closest thresholds: capacity {_overall(counts):.4f}",
            stacklevel=2,
        )
    return CalibrationResult(
        method=method,
        target_capacity=capacity,
        thresholds=_current_thresholds(model),
        calibration=_counts_dict(counts),
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
    from routertune.routing.observe import track_capacity

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


def _overall(counts: dict[int, tuple[int, int]]) -> float:
    total = sum(t for _, t in counts.values())
    return sum(k for k, _ in counts.values()) / total if total else float("nan")


def _counts_dict(counts: dict[int, tuple[int, int]]) -> dict[str, Any]:
    """The same shape as ``CapacityStats.as_dict()``."""
    return {
        "overall": _overall(counts),
        "per_layer": {str(i): (k / t if t else None) for i, (k, t) in counts.items()},
        "counts": {str(i): {"kept": k, "total": t} for i, (k, t) in counts.items()},
    }


def measure_capacity(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Capacity the routed model keeps on ``batches`` (``CapacityStats.as_dict()``)."""
    from routertune.routing.observe import track_capacity

    if not batches:
        raise CalibrationError("no batches to measure capacity on")
    with track_capacity(model) as stats:
        run_batches(model, batches)
    return stats.as_dict()


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

"""Static drops: the baseline at the same compute as a routed model.

    routertune drop --capacity 0.5 --output runs/drop-0.5               # attention drop
    routertune drop --unit mlp --capacity 0.75 --output runs/mlp-0.75   # MLP drop (or block)

    from routertune.baselines import attention_importance, apply_attention_drop
    importance = attention_importance(model, tokenizer, texts)          # {layer: 1 - cos}
    dropped = apply_attention_drop(model, importance, capacity=0.5)      # e.g. [17, 20, ...]
    save_drop(model, "runs/drop-0.5", report)
    # any unit: sublayer_importance(model, tokenizer, texts, unit="mlp"), apply_drop(..., unit="mlp")

Following "What Matters in Transformers? Not All Attention is Needed" (He et al., 2024, the
same group as Router-Tuning), the importance of a unit is how much it turns the residual stream
it writes to, averaged over every non-padding token of calibration data (instruction examples,
never evaluation data); the least important units are removed for every input:

* ``attn``: ``1 - cos(h, h + a)``, ``h`` the decoder layer's input, ``a`` the attention
  branch as it is added (after a post-norm, times a branch scale: :mod:`routertune.routing.arch`);
* ``mlp``: ``1 - cos(y - m, y)``, ``y`` the layer's output, ``m`` the MLP branch as it is added,
  so ``y - m`` is the stream the MLP adds to (``h + a`` in sequential layers, ``h`` in parallel
  ones);
* ``block``: ``1 - cos(h, y)``.

Same compute as a routed model. A unit can only be dropped from the layers a router could
skip: the default ``router_layers`` deepest layers except the last one, and for ``attn`` and
``block`` never a mask-anchor layer (:func:`routertune.routing.arch.mask_anchor_layers`: layer
0, whose KV cache sizes the masks). A routed model that keeps a share ``C`` of its routed units
matches a drop of ``round((1 - C) * len(candidates))`` of those units (rounded half up).

Mechanism. The drop is a router folder: routers (all zero) on the candidate layers at
``<unit>_sequence`` granularity, with threshold 0 (keep; the layer decides without scoring) on
kept layers and 2 (skip; the unit is never called, and skipped attention writes no KV) on
dropped ones. So dense, routed and dropped models run the same code path, ``routertune
eval/bench --routers`` take the folder unchanged, and ``attention_drop.json`` (``mlp_drop.json``,
``block_drop.json``) beside it records how it was chosen.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routertune.calibrate import make_batches
from routertune.routing.observe import run_batches
from routertune.routing.router import KEEP_ALL_THRESHOLD, SKIP_ALL_THRESHOLD

if TYPE_CHECKING:
    import torch
    from torch import nn

UNITS = ("attn", "mlp", "block")
DROP_REPORTS = {"attn": "attention_drop.json", "mlp": "mlp_drop.json", "block": "block_drop.json"}
DROP_REPORT = DROP_REPORTS["attn"]
UNIT_NAMES = {"attn": "attention", "mlp": "MLP", "block": "block"}
IMPORTANCE_FORMULAS = {
    "attn": "1 - cos(h, h + attn branch), h the layer input",
    "mlp": "1 - cos(y - mlp branch, y), y the layer output",
    "block": "1 - cos(h, y), h the layer input, y its output",
}
DEFAULT_ROUTER_LAYERS = 16  # RouterConfig's default: the same candidates as a default routed model


class AttentionDropError(ValueError):
    """Invalid drop request (count or capacity out of range, layers without importance, unknown unit)."""


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise AttentionDropError(f"unknown unit {unit!r}: one of {', '.join(UNITS)}")


def candidate_layers(model: nn.Module, router_layers: int = DEFAULT_ROUTER_LAYERS, unit: str = "attn") -> list[int]:
    """Layers whose ``unit`` may be dropped: those a ``<unit>_sequence`` router with
    ``router_layers`` would route (the deepest ``router_layers`` except the last; for ``attn``
    and ``block`` minus the mask-anchor layers, whose attention must always run)."""
    from routertune.routing.arch import decoder_layers, mask_anchor_layers
    from routertune.routing.config import RouterConfig

    _check_unit(unit)
    num_layers = len(decoder_layers(model))
    indices = RouterConfig(router_layers=router_layers).routed_layer_indices(num_layers)
    anchors = mask_anchor_layers(model) if unit in ("attn", "block") else set()
    return [i for i in indices if i not in anchors]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _ImportanceCollector:
    """Sums a unit's ``1 - cos`` over the valid tokens of each layer, via hooks on the decoder
    layer (its input and output) and on the end of the unit's branch."""

    def __init__(self, layers: list[int], unit: str) -> None:
        self.layers, self.unit = layers, unit
        self.sums: dict[int, float] = {i: 0.0 for i in layers}
        self.counts: dict[int, int] = {i: 0 for i in layers}
        self.valid: torch.Tensor | None = None  # (B, T) bool of the current batch
        self._inputs: dict[int, torch.Tensor] = {}
        self._branches: dict[int, torch.Tensor] = {}

    def layer_input(self, idx: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self._inputs[idx] = h.detach()

        return hook

    def branch_output(self, idx: int, scale: float):
        def hook(module, args, output):
            self._branches[idx] = _first(output).detach().float() * scale

        return hook

    def layer_output(self, idx: int):
        def hook(module, args, output):
            import torch.nn.functional as F

            h, y = self._inputs.pop(idx).float(), _first(output).detach().float()  # (B, T, C)
            if self.unit == "attn":
                before, after = h, h + self._branches.pop(idx)
            elif self.unit == "mlp":
                before, after = y - self._branches.pop(idx), y
            else:
                before, after = h, y
            one_minus = 1.0 - F.cosine_similarity(before, after, dim=-1)  # (B, T)
            one_minus = one_minus[self.valid] if self.valid is not None else one_minus.reshape(-1)
            self.sums[idx] += float(one_minus.sum())
            self.counts[idx] += one_minus.numel()

        return hook


def sublayer_importance(
    model: nn.Module,
    tokenizer: Any,
    data: list,
    unit: str = "attn",
    layers: list[int] | None = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> dict[int, float]:
    """Importance of each layer's ``unit`` (``attn``, ``mlp`` or ``block``): the mean ``1 - cos``
    of the module docstring over every non-padding token of ``data``. 0 means the unit leaves
    the residual direction unchanged. A model with routers is measured with every routed unit
    kept (the dense model).

    Args:
        model: a decoder-only causal LM (with or without routers).
        tokenizer: its tokenizer.
        data: texts, unified-format examples, or batches from
            :func:`routertune.calibrate.make_batches`.
        unit: what would be dropped.
        layers: layer indices to measure (default: all).
        batch_size, max_length: batching of ``data``.

    Returns:
        ``{layer index: importance}`` in layer order.
    """
    import contextlib

    from routertune.routing.arch import arch_spec, decoder_layers
    from routertune.routing.attach import all_units_kept, get_router_config

    _check_unit(unit)
    all_layers = decoder_layers(model)
    spec = arch_spec(model)
    layers = list(range(len(all_layers))) if layers is None else sorted(layers)
    bad = [i for i in layers if not 0 <= i < len(all_layers)]
    if bad:
        raise AttentionDropError(f"layers {bad} do not exist in a model with {len(all_layers)} layers")
    batches = make_batches(tokenizer, data, batch_size=batch_size, max_length=max_length)
    collector = _ImportanceCollector(layers, unit)
    handles = []
    for i in layers:
        layer = all_layers[i]
        handles.append(layer.register_forward_pre_hook(collector.layer_input(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(collector.layer_output(i)))
        if unit != "block":
            part = spec.attention if unit == "attn" else spec.mlp
            branch_end = getattr(layer, spec.branch_end.get(unit, part))  # a post-norm, else the unit itself
            scale = float(getattr(layer, spec.branch_scale)) if spec.branch_scale else 1.0
            handles.append(branch_end.register_forward_hook(collector.branch_output(i, scale)))
    dense = all_units_kept(model) if get_router_config(model) is not None else contextlib.nullcontext()
    try:
        with dense:
            for batch in batches:
                collector.valid = batch["attention_mask"].bool().to(next(model.parameters()).device)
                run_batches(model, [batch])
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in layers if collector.counts[i] == 0]
    if missing:
        raise AttentionDropError(f"{UNIT_NAMES[unit]} of layers {missing} never ran on the calibration data")
    return {i: collector.sums[i] / collector.counts[i] for i in layers}


def attention_importance(
    model: nn.Module,
    tokenizer: Any,
    data: list,
    layers: list[int] | None = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> dict[int, float]:
    """:func:`sublayer_importance` of the attention: ``{layer: mean 1 - cos(h, h + attn)}``."""
    return sublayer_importance(model, tokenizer, data, "attn", layers, batch_size, max_length)


def n_drop_for_capacity(capacity: float, n_candidates: int) -> int:
    """Units to drop so that ``capacity`` of ``n_candidates`` are kept (half up)."""
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not math.isfinite(capacity):
        raise AttentionDropError(f"capacity must be a number in [0, 1]; got {capacity!r}")
    if not 0.0 <= capacity <= 1.0:
        raise AttentionDropError(f"capacity must be in [0, 1]; got {capacity}")
    return int(math.floor((1.0 - capacity) * n_candidates + 0.5))


def choose_dropped(importance: dict[int, float], candidates: list[int], n_drop: int) -> list[int]:
    """The ``n_drop`` least important candidates (ties: the deeper layer first), sorted."""
    missing = [i for i in candidates if i not in importance]
    if missing:
        raise AttentionDropError(f"no importance for candidate layers {missing}")
    if isinstance(n_drop, bool) or not isinstance(n_drop, int) or not 0 <= n_drop <= len(candidates):
        raise AttentionDropError(
            f"n_drop must be an integer in [0, {len(candidates)}] (the candidate layers {candidates}); got {n_drop!r}"
        )
    ranked = sorted(candidates, key=lambda i: (importance[i], -i))
    return sorted(ranked[:n_drop])


def apply_drop(
    model: nn.Module,
    importance: dict[int, float],
    n_drop: int | None = None,
    capacity: float | None = None,
    candidates: list[int] | None = None,
    unit: str = "attn",
) -> list[int]:
    """Drops the least important ``unit`` sub-layers of ``model`` for real (in place).

    Attaches ``<unit>_sequence`` routers to the candidate layers and fixes their thresholds: 0
    (always run) for kept layers, 2 (never run; skipped attention writes no KV) for dropped ones.

    Args:
        model: a causal LM without routers.
        importance: ``{layer: importance}`` from :func:`sublayer_importance` for this unit.
        n_drop: how many units to drop; or
        capacity: the share of candidate units to keep (as a routed model's capacity).
        candidates: droppable layers (default :func:`candidate_layers` for this unit).
        unit: ``attn``, ``mlp`` or ``block``.

    Returns:
        The dropped layer indices, sorted.

    Raises:
        AttentionDropError: neither or both of ``n_drop``/``capacity``, values out of range, an
            unknown unit, or importance missing for a candidate. RouterConfigError: the model
            already has routers.
    """
    from routertune.routing.attach import get_router_config
    from routertune.routing.config import RouterConfigError

    _check_unit(unit)
    if (n_drop is None) == (capacity is None):
        raise AttentionDropError("give exactly one of n_drop and capacity")
    if get_router_config(model) is not None:
        raise RouterConfigError("this model already has routers; apply the drop to a plain model")
    candidates = candidate_layers(model, unit=unit) if candidates is None else sorted(candidates)
    if not candidates:
        raise AttentionDropError(f"no candidate layer to drop {UNIT_NAMES[unit]} from")
    if capacity is not None:
        n_drop = n_drop_for_capacity(capacity, len(candidates))
    dropped = choose_dropped(importance, candidates, n_drop)
    drop_layers(model, dropped, candidates, unit)
    return dropped


def apply_attention_drop(
    model: nn.Module,
    importance: dict[int, float],
    n_drop: int | None = None,
    capacity: float | None = None,
    candidates: list[int] | None = None,
) -> list[int]:
    """:func:`apply_drop` of the attention (the baseline of attention routers)."""
    return apply_drop(model, importance, n_drop, capacity, candidates, "attn")


def drop_layers(
    model: nn.Module, dropped: list[int], candidates: list[int] | None = None, unit: str = "attn"
) -> None:
    """Drops the ``unit`` of exactly the ``dropped`` layers (in place), as a router folder would:
    ``<unit>_sequence`` routers on the candidates, threshold 2 (never run) on the dropped ones
    and 0 (always run) on the others.

    Raises:
        AttentionDropError: a dropped layer that is not a candidate, an unknown unit.
            RouterConfigError: the model already has routers.
    """
    from routertune.routing.attach import attach_routers, get_router_config, set_thresholds
    from routertune.routing.config import RouterConfig, RouterConfigError

    _check_unit(unit)
    if get_router_config(model) is not None:
        raise RouterConfigError("this model already has routers; apply the drop to a plain model")
    candidates = candidate_layers(model, unit=unit) if candidates is None else sorted(candidates)
    outside = sorted(set(dropped) - set(candidates))
    if outside:
        raise AttentionDropError(f"layers {outside} are not candidates for dropping (candidates: {candidates})")
    attach_routers(model, RouterConfig(granularity=f"{unit}_sequence", layers=candidates))
    set_thresholds(model, {i: SKIP_ALL_THRESHOLD if i in dropped else KEEP_ALL_THRESHOLD for i in candidates})


def drop_report(
    importance: dict[int, float],
    candidates: list[int],
    dropped: list[int],
    data: str | None = None,
    n_examples: int | None = None,
    unit: str = "attn",
) -> dict[str, Any]:
    """The JSON record written beside a dropped model's router files."""
    _check_unit(unit)
    return {
        "method": DROP_REPORTS[unit].removesuffix(".json"),
        "unit": unit,
        "importance": f"{IMPORTANCE_FORMULAS[unit]}, mean over non-padding calibration tokens",
        "layer_importance": {str(i): v for i, v in sorted(importance.items())},
        "candidates": list(candidates),
        "dropped": list(dropped),
        "n_drop": len(dropped),
        "capacity": 1.0 - len(dropped) / len(candidates) if candidates else None,
        "calibration_data": data,
        "calibration_examples": n_examples,
    }


def save_drop(model: nn.Module, path: str | Path, report: dict[str, Any]) -> Path:
    """Writes the dropped model's router folder (config, routers, the report as
    ``attention_drop.json``, ``mlp_drop.json`` or ``block_drop.json``).

    The folder is built beside ``path`` and swapped in when complete.
    """
    from routertune.io_utils import atomic_dir
    from routertune.routing.router_files import save_routers

    path = Path(path)
    with atomic_dir(path) as tmp:
        save_routers(model, tmp)
        (tmp / DROP_REPORTS[report.get("unit", "attn")]).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return path



def assistant_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token loss (nats) on the assistant tokens of ``batches``, as the model runs now.

    The quality measure of docs/baselines.md: compare the dense, routed, calibrated and
    dropped models on held-out instruction examples at equal capacity. Logits are computed
    only at labelled positions (the LM head over every position would dominate the cost).

    Args:
        model: a causal LM (routed layers skip as they would in generation).
        batches: from :func:`routertune.calibrate.make_batches` on unified-format examples
            (they carry ``labels``: -100 outside assistant turns).

    Raises:
        AttentionDropError: no batch carries labels, or no label is set.
    """
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if "labels" not in batch:
                    continue
                logits, targets, _ = labelled_logits(model, batch)
                total += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
                count += len(targets)
    finally:
        model.train(was_training)
    if count == 0:
        raise AttentionDropError("no assistant token to score: batches need labels (unified-format examples)")
    return total / count


def labelled_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The model's logits at the positions that predict a labelled token, as the model runs now.

    Only those positions go through the LM head (over every position it would dominate the
    cost). Returns ``(logits (N, V), targets (N,), chosen (B, T - 1) bool)``: position ``t``
    predicts token ``t + 1``, and ``chosen`` says which positions the N rows are, row-major.
    """
    from routertune.routing.arch import base_model

    device = next(model.parameters()).device
    hidden = base_model(model)(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    ).last_hidden_state  # (B, T, C)
    targets = batch["labels"][:, 1:].to(device)
    chosen = targets != -100
    return model.get_output_embeddings()(hidden[:, :-1][chosen]), targets[chosen], chosen

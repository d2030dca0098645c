"""Attention drop: the static baseline at the same compute as a routed model.

    routertune drop --capacity 0.5 --output runs/drop-0.5

    from routertune.baselines import attention_importance, apply_attention_drop
    importance = attention_importance(model, tokenizer, texts)          # {layer: 1 - cos}
    dropped = apply_attention_drop(model, importance, capacity=0.5)      # e.g. [17, 20, ...]
    save_attention_drop(model, "runs/drop-0.5", report)

Following "What Matters in Transformers? Not All Attention is Needed" (He et al., 2024, the
same group as Router-Tuning), the importance of layer ``l``'s attention is how much it turns
its residual stream: ``1 - cos(h, h + attn(norm(h)))``, where ``h`` is the layer's input,
averaged over every non-padding token of calibration data (instruction examples, never
evaluation data). The least important attention sub-layers are removed for every input.

Same compute as a routed model. Attention can only be dropped from the layers a router could
skip: the default ``router_layers`` deepest layers except the last one, never a mask-anchor
layer (:func:`routertune.routing.arch.mask_anchor_layers`: layer 0, whose KV cache sizes the masks).
A routed model that keeps a share ``C`` of its routed attention units matches a drop of
``round((1 - C) * len(candidates))`` of those layers (rounded half up).

Mechanism. The drop is a router folder: routers (all zero) on the candidate layers at
``attn_sequence`` granularity, with threshold 0 (keep; the layer decides without scoring) on
kept layers and 2 (skip; attention is never called and writes no KV) on dropped ones. So
dense, routed and dropped models run the same code path, ``routertune eval/bench --routers``
take the folder unchanged, and ``attention_drop.json`` beside it records how it was chosen.
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

DROP_REPORT = "attention_drop.json"
DEFAULT_ROUTER_LAYERS = 16  # RouterConfig's default: the same candidates as a default routed model


class AttentionDropError(ValueError):
    """Invalid attention-drop request (count or capacity out of range, layers without importance)."""


def candidate_layers(model: nn.Module, router_layers: int = DEFAULT_ROUTER_LAYERS) -> list[int]:
    """Layers whose attention may be dropped: those a router with ``router_layers`` would route.

    The deepest ``router_layers`` layers except the last, minus the mask-anchor layers.
    """
    from routertune.routing.arch import decoder_layers, mask_anchor_layers
    from routertune.routing.config import RouterConfig

    num_layers = len(decoder_layers(model))
    indices = RouterConfig(router_layers=router_layers).routed_layer_indices(num_layers)
    anchors = mask_anchor_layers(model)
    return [i for i in indices if i not in anchors]


class _ImportanceCollector:
    """Sums ``1 - cos(h, h + attn)`` over the valid tokens of each layer, via hooks."""

    def __init__(self, layers: list[int]) -> None:
        self.layers = layers
        self.sums: dict[int, float] = {i: 0.0 for i in layers}
        self.counts: dict[int, int] = {i: 0 for i in layers}
        self.valid: torch.Tensor | None = None  # (B, T) bool of the current batch
        self._inputs: dict[int, torch.Tensor] = {}

    def layer_input(self, idx: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self._inputs[idx] = h.detach()

        return hook

    def attention_output(self, idx: int):
        def hook(module, args, output):
            import torch.nn.functional as F

            attn = output[0] if isinstance(output, tuple) else output
            h = self._inputs.pop(idx).float()  # (B, T, C)
            cos = F.cosine_similarity(h, h + attn.detach().float(), dim=-1)  # (B, T)
            one_minus = (1.0 - cos)[self.valid] if self.valid is not None else (1.0 - cos).reshape(-1)
            self.sums[idx] += float(one_minus.sum())
            self.counts[idx] += one_minus.numel()

        return hook


def attention_importance(
    model: nn.Module,
    tokenizer: Any,
    data: list,
    layers: list[int] | None = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> dict[int, float]:
    """Importance of each layer's attention: mean ``1 - cos(h, h + attn(norm(h)))`` over tokens.

    ``h`` ``(B, T, C)`` is the decoder layer's input; the mean runs over every non-padding
    token of ``data``. 0 means the attention leaves the residual direction unchanged.
    A model with routers is measured with every routed unit kept (the dense model).

    Args:
        model: a decoder-only causal LM (with or without routers).
        tokenizer: its tokenizer.
        data: texts, unified-format examples, or batches from
            :func:`routertune.calibrate.make_batches`.
        layers: layer indices to measure (default: all).
        batch_size, max_length: batching of ``data``.

    Returns:
        ``{layer index: importance}`` in layer order.
    """
    import contextlib

    from routertune.routing.arch import arch_spec, decoder_layers
    from routertune.routing.attach import all_units_kept, get_router_config

    all_layers = decoder_layers(model)
    attention = arch_spec(model).attention  # the family's own name (self_attn, attention, ...)
    layers = list(range(len(all_layers))) if layers is None else sorted(layers)
    bad = [i for i in layers if not 0 <= i < len(all_layers)]
    if bad:
        raise AttentionDropError(f"layers {bad} do not exist in a model with {len(all_layers)} layers")
    batches = make_batches(tokenizer, data, batch_size=batch_size, max_length=max_length)
    collector = _ImportanceCollector(layers)
    handles = []
    for i in layers:
        layer = all_layers[i]
        handles.append(layer.register_forward_pre_hook(collector.layer_input(i), with_kwargs=True))
        handles.append(getattr(layer, attention).register_forward_hook(collector.attention_output(i)))
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
        raise AttentionDropError(f"attention of layers {missing} never ran on the calibration data")
    return {i: collector.sums[i] / collector.counts[i] for i in layers}


def n_drop_for_capacity(capacity: float, n_candidates: int) -> int:
    """Attention layers to drop so that ``capacity`` of ``n_candidates`` are kept (half up)."""
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


def apply_attention_drop(
    model: nn.Module,
    importance: dict[int, float],
    n_drop: int | None = None,
    capacity: float | None = None,
    candidates: list[int] | None = None,
) -> list[int]:
    """Drops the least important attention sub-layers of ``model`` for real (in place).

    Attaches ``attn_sequence`` routers to the candidate layers and fixes their thresholds: 0
    (always run) for kept layers, 2 (never run, no KV written) for dropped ones.

    Args:
        model: a causal LM without routers.
        importance: ``{layer: importance}`` from :func:`attention_importance`.
        n_drop: how many attention sub-layers to drop; or
        capacity: the share of candidate attention layers to keep (as a routed model's capacity).
        candidates: droppable layers (default :func:`candidate_layers`).

    Returns:
        The dropped layer indices, sorted.

    Raises:
        AttentionDropError: neither or both of ``n_drop``/``capacity``, values out of range, or
            importance missing for a candidate. RouterConfigError: the model already has routers.
    """
    from routertune.routing.attach import get_router_config
    from routertune.routing.config import RouterConfigError

    if (n_drop is None) == (capacity is None):
        raise AttentionDropError("give exactly one of n_drop and capacity")
    if get_router_config(model) is not None:
        raise RouterConfigError("this model already has routers; apply the attention drop to a plain model")
    candidates = candidate_layers(model) if candidates is None else sorted(candidates)
    if not candidates:
        raise AttentionDropError("no candidate layer to drop attention from")
    if capacity is not None:
        n_drop = n_drop_for_capacity(capacity, len(candidates))
    dropped = choose_dropped(importance, candidates, n_drop)
    drop_layers(model, dropped, candidates)
    return dropped


def drop_layers(model: nn.Module, dropped: list[int], candidates: list[int] | None = None) -> None:
    """Drops the attention of exactly the ``dropped`` layers (in place), as a router folder would:
    ``attn_sequence`` routers on the candidates, threshold 2 (never run) on the dropped ones and
    0 (always run) on the others.

    Raises:
        AttentionDropError: a dropped layer that is not a candidate. RouterConfigError: the model
            already has routers.
    """
    from routertune.routing.attach import attach_routers, get_router_config, set_thresholds
    from routertune.routing.config import RouterConfig, RouterConfigError

    if get_router_config(model) is not None:
        raise RouterConfigError("this model already has routers; apply the attention drop to a plain model")
    candidates = candidate_layers(model) if candidates is None else sorted(candidates)
    outside = sorted(set(dropped) - set(candidates))
    if outside:
        raise AttentionDropError(f"layers {outside} are not candidates for dropping (candidates: {candidates})")
    attach_routers(model, RouterConfig(granularity="attn_sequence", layers=candidates))
    set_thresholds(model, {i: SKIP_ALL_THRESHOLD if i in dropped else KEEP_ALL_THRESHOLD for i in candidates})


def drop_report(
    importance: dict[int, float],
    candidates: list[int],
    dropped: list[int],
    data: str | None = None,
    n_examples: int | None = None,
) -> dict[str, Any]:
    """The JSON record written beside a dropped model's router files."""
    return {
        "method": "attention_drop",
        "importance": "1 - cos(h, h + attn(norm(h))), mean over non-padding calibration tokens",
        "layer_importance": {str(i): v for i, v in sorted(importance.items())},
        "candidates": list(candidates),
        "dropped": list(dropped),
        "n_drop": len(dropped),
        "capacity": 1.0 - len(dropped) / len(candidates) if candidates else None,
        "calibration_data": data,
        "calibration_examples": n_examples,
    }


def save_attention_drop(model: nn.Module, path: str | Path, report: dict[str, Any]) -> Path:
    """Writes the dropped model's router folder (config, routers, ``attention_drop.json``).

    The folder is built beside ``path`` and swapped in when complete.
    """
    from routertune.io_utils import atomic_dir
    from routertune.routing.router_files import save_routers

    path = Path(path)
    with atomic_dir(path) as tmp:
        save_routers(model, tmp)
        (tmp / DROP_REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
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

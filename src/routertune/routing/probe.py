"""The attach-time probe: every routed layer class is exact, or the model is refused by name.

Before the wrappers go in, one short forward of the plain model (2 x 6 random tokens, no cache)
records the real arguments of one routed layer per (layer class, attention type), and that plain
layer's outputs: as it is, with the routed sub-layers' outputs replaced by zeros for every row,
and for a mixed decision (one row, or alternate tokens). After wrapping, the same layer runs with
the same arguments and forced decisions: keep everything must give the plain output, skip
everything and the mixed decision the zeroed outputs. Any difference, or any error, detaches the
routers and raises :class:`UnsupportedArchitectureError` naming the layer class and what differed.
So a family routertune has never seen is either exact or refused, never silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from routertune.routing.arch import ArchSpec, UnsupportedArchitectureError, decoder_layers

PROBE_SHAPE = (2, 6)  # (batch, tokens): two rows so a mixed sequence decision exists


class _Captured(Exception):
    pass


@dataclass
class LayerCall:
    """One plain layer's arguments and reference outputs."""

    index: int
    args: tuple
    kwargs: dict
    outputs: dict[str, torch.Tensor]  # "plain", "skip", "mixed"
    mixed_keep: torch.Tensor  # (B,) or (B, T) bool


def _representatives(model: nn.Module, indices: list[int]) -> list[int]:
    layers = decoder_layers(model)
    layer_types = getattr(model.config, "layer_types", None)
    seen, reps = set(), []
    for i in indices:
        key = (type(layers[i]), layer_types[i] if layer_types else None)
        if key not in seen:
            seen.add(key)
            reps.append(i)
    return reps


def _zeroing_hook(keep: torch.Tensor):
    def hook(module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        m = keep.view(*keep.shape, *([1] * (first.dim() - keep.dim()))).to(first.dtype)
        return (first * m, *output[1:]) if isinstance(output, tuple) else first * m

    return hook


def _run_zeroed(layer: nn.Module, parts: list[nn.Module], keep: torch.Tensor, args, kwargs) -> torch.Tensor:
    handles = [p.register_forward_hook(_zeroing_hook(keep)) for p in parts]
    try:
        return _first(layer(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def capture_layer_calls(
    model: nn.Module, spec: ArchSpec, indices: list[int], parts: tuple[str, ...], unit: str
) -> list[LayerCall]:
    """Arguments and reference outputs of the plain layers to probe (before wrapping).

    Args:
        parts: the sub-layers the granularity skips (``RouterConfig.parts``).
        unit: ``sequence`` or ``token``.
    """
    layers = decoder_layers(model)
    reps = _representatives(model, indices)
    captured: dict[int, tuple[tuple, dict]] = {}

    def grab(i):
        def hook(module, args, kwargs):
            captured[i] = (args, dict(kwargs))
            if len(captured) == len(reps):
                raise _Captured

        return hook

    handles = [layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in reps]
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, PROBE_SHAPE, generator=g).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if len(captured) != len(reps):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: the probe forward did not reach decoder layers {sorted(set(reps) - set(captured))}"
        )
    calls = []
    B, T = PROBE_SHAPE
    for i in reps:
        layer = layers[i]
        args, kwargs = captured[i]
        modules = [getattr(layer, spec.attention if part == "attn" else spec.mlp) for part in parts]
        if unit == "sequence":
            mixed = torch.tensor([False, True], device=device)
        else:
            mixed = (
                torch.arange(T, device=device).view(1, T) + torch.arange(B, device=device).view(B, 1)
            ) % 2 == 0
        layer.eval()
        with torch.no_grad():
            outputs = {
                "plain": _first(layer(*args, **kwargs)),
                "skip": _run_zeroed(layer, modules, torch.zeros_like(mixed), args, kwargs),
                "mixed": _run_zeroed(layer, modules, mixed, args, kwargs),
            }
        layer.train(was_training)
        calls.append(LayerCall(i, args, kwargs, outputs, mixed))
    return calls


def probe_routed_layers(model: nn.Module, calls: list[LayerCall], routings: dict[int, Any]) -> None:
    """Runs the wrapped layers on the recorded calls; raises if any differs from its reference.

    Args:
        routings: layer index -> its ``LayerRouting`` (whose decision the probe forces).
    """
    layers = decoder_layers(model)
    for call in calls:
        layer, routing = layers[call.index], routings[call.index]
        ref_plain = call.outputs["plain"]
        cases = {
            "plain": (torch.ones_like(call.mixed_keep), "routers on (keep everything)", "the plain layer"),
            "skip": (
                torch.zeros_like(call.mixed_keep),
                "skipping every row",
                "the layer with that output zeroed",
            ),
            "mixed": (call.mixed_keep, "a mixed decision", "the layer with that output zeroed where skipped"),
        }
        was_training = layer.training
        layer.eval()
        try:
            for key, (keep, what, reference) in cases.items():
                routing.forced_keep = keep
                try:
                    with torch.no_grad():
                        got = _first(layer(*call.args, **call.kwargs))
                except Exception as exc:
                    raise _refusal(
                        model, layer, call.index, f"{what} raised {type(exc).__name__}: {exc}"
                    ) from exc
                want = call.outputs[key]
                if got.shape != want.shape or not _close(got, want, ref_plain):
                    diff = (
                        (got.float() - want.float()).abs().max().item()
                        if got.shape == want.shape
                        else "shape"
                    )
                    raise _refusal(
                        model, layer, call.index, f"{what} differs from {reference} (max |diff| {diff})"
                    )
        finally:
            routing.forced_keep = None
            routing.decision = None
            layer.train(was_training)


def _close(got: torch.Tensor, want: torch.Tensor, scale_ref: torch.Tensor) -> bool:
    tol = 1e-4 if got.dtype == torch.float32 or got.dtype == torch.float64 else 2e-2
    scale = max(1.0, float(scale_ref.float().abs().max()))
    return bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * scale))


def _refusal(model: nn.Module, layer: nn.Module, idx: int, what: str) -> UnsupportedArchitectureError:
    model_type = getattr(model.config, "model_type", None)
    return UnsupportedArchitectureError(
        f"decoder layer class {type(layer).__name__} ({model_type}, layer {idx}): {what}; "
        "routertune cannot route this family exactly (attach_routers probe)"
    )

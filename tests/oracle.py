"""An independent oracle for routed models: decisions computed by hand, outputs from the plain model.

Nothing here imports routertune's routing code. Given the router weights and thresholds of a
routed model, :func:`hand_routed_logits` recomputes every decision from the plain model's own
hidden states (``sigmoid(w . x) - threshold >= 0``, where ``x`` is the routed attention's input:
its mean over the decision tokens for ``*_sequence``, each token for ``*_token``), layer by layer,
and builds the output by running the plain model with the skipped sub-layers' outputs replaced by
zeros (forward hooks on the model's own attention / MLP modules). A routed model is correct iff its
outputs equal these at every real token.
"""

from __future__ import annotations

import torch
from torch import nn

# Where each family keeps its decoder layers and sub-layers (the test's own knowledge, written
# from the transformers modeling files; routertune's table is not consulted).
LAYOUT = {
    "gpt_neox": ("gpt_neox", "layers", "attention", "mlp"),
}
DEFAULT_LAYOUT = ("model", "layers", "self_attn", "mlp")
# Families whose branches end in a post-norm: the module whose output is added to the residual.
BRANCH_ENDS = {
    family: {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}
    for family in ("gemma2", "gemma3_text", "olmo2")
}


def layout(model: nn.Module) -> tuple[str, str, str, str]:
    return LAYOUT.get(model.config.model_type, DEFAULT_LAYOUT)


def plain_layers(model: nn.Module) -> nn.ModuleList:
    base, layers, _, _ = layout(model)
    return getattr(getattr(model, base), layers)


def sublayer(model: nn.Module, idx: int, part: str) -> nn.Module:
    _, _, attn, mlp = layout(model)
    return getattr(plain_layers(model)[idx], attn if part == "attn" else mlp)


def attention_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def capture_attention_input(plain: nn.Module, idx: int, *inputs, **kw) -> torch.Tensor:
    """The input of layer ``idx``'s attention in a plain forward (``(B, T, C)``)."""
    captured = {}
    handle = sublayer(plain, idx, "attn").register_forward_pre_hook(
        lambda m, a, k: captured.__setitem__("x", attention_input(a, k).detach()), with_kwargs=True
    )
    with torch.no_grad():
        plain(*inputs, **kw)
    handle.remove()
    return captured["x"]


class ZeroedSublayers:
    """Forward hooks on a plain model that zero sub-layer outputs where ``keep`` is False.

    ``keep[(layer, part)]`` is ``(B,)`` (whole rows) or ``(B, T)`` (tokens).
    """

    def __init__(self, model: nn.Module, keep: dict[tuple[int, str], torch.Tensor]) -> None:
        self.handles = []
        for (idx, part), k in keep.items():
            module = sublayer(model, idx, part)
            self.handles.append(module.register_forward_hook(self._zero(k)))

    @staticmethod
    def _zero(keep: torch.Tensor):
        def hook(module, args, output):
            first = output[0] if isinstance(output, tuple) else output
            m = keep.view(*keep.shape, *([1] * (first.dim() - keep.dim()))).to(first.dtype)
            if keep.dim() == 2 and first.shape[1] != keep.shape[1]:
                m = m[:, -first.shape[1] :]
            zeroed = first * m
            return (zeroed, *output[1:]) if isinstance(output, tuple) else zeroed

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def split_threshold(scores: torch.Tensor) -> float:
    """A threshold that splits ``scores`` near their median, midway across the widest gap
    between neighbouring scores in their middle half: no score sits at (or within rounding of)
    the threshold, so the routed model, whose kernels round differently from this oracle's
    (batch sizes, CPUs), takes the same decisions."""
    s = scores.flatten().sort().values
    n = s.numel()
    if n < 2:
        return float(s[0]) if n else 0.5
    lo, hi = max(1, n // 4), max(1, min(n - 1, (3 * n) // 4))
    gaps = s[lo : hi + 1] - s[lo - 1 : hi]
    k = lo + int(gaps.argmax())
    return float((s[k - 1] + s[k]) / 2)


def hand_routed_logits(
    plain: nn.Module,
    routers: dict[int, tuple[torch.Tensor, float | None]],
    granularity: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    routing_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, float]]:
    """Logits of ``plain`` routed by hand, the decisions taken per layer and the thresholds used.

    Args:
        routers: layer index -> (router weight ``(1, C)``, threshold); a threshold of None is
            set near the median score of the layer's decision units (:func:`split_threshold`),
            so its decisions are mixed.
        granularity: ``<attn|mlp|block>_<sequence|token>``.
        routing_mask: ``(B, T)`` tokens a sequence router decides on (padding excluded anyway).
    """
    target, unit = granularity.split("_")
    parts = {"attn": ("attn",), "mlp": ("mlp",), "block": ("attn", "mlp")}[target]
    B, T = input_ids.shape
    valid = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    decide_on = valid if routing_mask is None else valid & routing_mask.bool()
    decide_on = torch.where(decide_on.any(1, keepdim=True), decide_on, valid)  # empty rows: all real
    decisions: dict[int, torch.Tensor] = {}
    thresholds: dict[int, float] = {}
    for idx in sorted(routers):
        weight, threshold = routers[idx]
        captured = {}

        def grab(module, args, kwargs, captured=captured):
            captured["x"] = attention_input(args, kwargs).detach()

        handle = sublayer(plain, idx, "attn").register_forward_pre_hook(grab, with_kwargs=True)
        zeroed = ZeroedSublayers(plain, {(i, p): k for i, k in decisions.items() for p in parts})
        with torch.no_grad():
            plain(input_ids, attention_mask=attention_mask)
        handle.remove()
        zeroed.remove()
        x = captured["x"].float()  # (B, T, C)
        if unit == "sequence":
            w = decide_on.float().unsqueeze(-1)
            x = (x * w).sum(1) / w.sum(1)  # (B, C)
        score = torch.sigmoid(x @ weight.float().reshape(-1, 1)).squeeze(-1)
        if threshold is None:
            threshold = split_threshold(score if unit == "sequence" else score[valid])
        thresholds[idx] = threshold
        keep = (score - threshold) >= 0
        if unit == "token":
            keep = keep & valid
        decisions[idx] = keep
    zeroed = ZeroedSublayers(plain, {(i, p): k for i, k in decisions.items() for p in parts})
    with torch.no_grad():
        logits = plain(input_ids, attention_mask=attention_mask).logits
    zeroed.remove()
    return logits, decisions, thresholds


def straight_through_router_grads(
    plain: nn.Module, layers: list[int], granularity: str, input_ids: torch.Tensor
) -> dict[int, torch.Tensor]:
    """The straight-through gradient of zero-initialised routers, from the plain model.

    With zero weights every score is sigmoid(0) = 0.5 and every unit is kept; the gate's forward
    value is 1 and its gradient reaches the score unchanged, so for a branch output ``b`` scaled
    by the gate, ``dL/dw = sum_units dL/dg * sigmoid'(0) * x = sum dL/dg * 0.25 * x``, where ``x``
    is the unit's router input. ``dL/dg`` is taken with a scale of 1 at the end of each routed
    branch (after a family's post-norm) in the plain model.
    """
    target, unit = granularity.split("_")
    parts = {"attn": ("attn",), "mlp": ("mlp",), "block": ("attn", "mlp")}[target]
    B, T = input_ids.shape
    shape = (B, 1, 1) if unit == "sequence" else (B, T, 1)
    scales = {i: torch.ones(shape, requires_grad=True) for i in layers}
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    ends = BRANCH_ENDS.get(plain.config.model_type, {})
    for i in layers:
        handles.append(
            sublayer(plain, i, "attn").register_forward_pre_hook(
                lambda m, a, k, i=i: inputs.__setitem__(i, attention_input(a, k).detach()), with_kwargs=True
            )
        )
        for part in parts:
            module = getattr(plain_layers(plain)[i], ends[part]) if part in ends else sublayer(plain, i, part)

            def scale(m, a, out, i=i):
                first = out[0] if isinstance(out, tuple) else out
                scaled = first * scales[i].to(first.dtype)
                return (scaled, *out[1:]) if isinstance(out, tuple) else scaled

            handles.append(module.register_forward_hook(scale))
    was_training = plain.training
    plain.train()
    for p in plain.parameters():
        p.requires_grad_(False)
    plain(input_ids, labels=input_ids).loss.backward()
    plain.train(was_training)
    for h in handles:
        h.remove()
    grads = {}
    for i in layers:
        x = inputs[i].float()
        x = x.mean(1, keepdim=True) if unit == "sequence" else x  # (B, 1|T, C)
        grads[i] = (scales[i].grad * 0.25 * x).sum((0, 1)).reshape(1, -1)
    return grads

"""Routed sub-layers: wrappers around the model's own attention and MLP modules.

The decoder layer's own forward runs unchanged. Its attention module is replaced by a
:class:`RoutedAttention` (the original inside as ``base_layer``, the router beside it), and for
``mlp_*`` / ``block_*`` its MLP by a :class:`RoutedMLP`. A wrapper returns zeros for the rows or
tokens it skips and does not call its base module where nothing is kept (no projections, no
kernel, no KV write), so every residual layout, multiplier and post-norm of the family applies
as the model's authors wrote it. Skipping a sub-layer is therefore exactly the model with that
sub-layer's output replaced by zeros, which the attach-time probe checks per layer class.

Every target decides at the attention's input (the input-layernormed hidden state in pre-norm
families): its mean over the decision tokens for ``*_sequence``, each token for ``*_token``.
``block_*`` skips attention and MLP together on that one decision; ``mlp_*`` skips the MLP on it.

Per forward:

* training (``module.training`` and grad enabled): every unit is computed and the hard 0/1
  decision is applied through the straight-through estimator, at the end of the branch (after a
  family's post-norm, where the table names one), so routers of skipped units still learn;
* otherwise only kept units are computed:
  * ``*_sequence``: the kept rows run on their own (row-sliced arguments; a dynamic cache layer
    holds the kept rows only, a static one zero rows for the others); a sub-layer that every row
    skips is not called. Routes are decided at
    prefill and stored on the request's KV cache (:mod:`routertune.routing.routes`), so decode steps
    reuse them and a layer skipped by the whole batch never writes KV.
  * ``*_token``: the MLP runs on the kept tokens only; attention computes keys/values for all
    tokens and queries only for the kept ones (:mod:`routertune.routing.token_attention`) where the
    family's table entry allows, else every query. A decode step of a batch runs its kept rows
    alone where the decision is in host memory (CPU) and, on an accelerator, computes every row
    and zeroes the skipped ones (no device synchronisation per layer and step).
* under ``torch.compile`` (not training): a sub-layer whose threshold fixes the decision is
  traced as the plain or deleted sub-layer; any other runs the code above inside one opaque op
  (:mod:`routertune.routing.compiled`), so the graph holds no route and never recompiles for one.

See docs/design.md for the measurements behind these choices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from routertune.routing import compiled, masks
from routertune.routing.arch import CACHE_KWARGS, ArchSpec, UnsupportedArchitectureError
from routertune.routing.router import Router, masked_sequence_mean, straight_through_gate
from routertune.routing.routes import ROUTES_ATTR, RowsOfCache, SequenceRoute, routes_of  # noqa: F401 (ROUTES_ATTR re-exported)
from routertune.routing.token_attention import (
    kept_query_attention,
    kept_row_attention,
    keys_and_values,
    supports_kept_queries,
)

# Keyword argument that carries the 2-D padding mask from the base model to every decoder layer.
TOKEN_MASK_KWARG = "routertune_token_mask"
# Keyword argument that carries an optional 2-D mask of the tokens a sequence router decides on
# (e.g. the prompt only, not the answer being scored or learnt); padding is excluded anyway.
ROUTING_MASK_KWARG = "routertune_routing_mask"


def decision_on_host(keep: torch.Tensor) -> bool:
    """Whether reading ``keep`` on the host is free (no device synchronisation)."""
    return keep.device.type == "cpu"


class Decision:
    """What the deciding wrapper found for one forward of its layer (read by the MLP wrapper).

    Exactly one of ``route`` (sequence inference), ``keep`` (token inference) or ``gate``
    (training) is set.
    """

    def __init__(
        self, route: SequenceRoute | None = None, keep=None, gate=None, fixed: bool | None = None
    ) -> None:
        self.route = route
        self.keep = keep  # (B, T) bool
        self.gate = gate  # (B, 1, 1) or (B, T, 1) straight-through gate
        # A decode step of a batch (one token per row): where the decision is already in host
        # memory (a CPU tensor) reading it costs nothing, so only the kept rows run
        # (``kept_rows``); on an accelerator that read would stall the device once per layer and
        # step, so every row is computed and the skipped rows' update zeroed (``masked``)
        # instead (docs/design.md (b) has the measurements).
        self.masked = False
        self.kept_rows: list[int] | None = None
        if keep is not None and fixed is not None:  # a threshold fixed it: known without a host read
            self.max_kept, self.all_kept = (keep.shape[1] if fixed else 0), fixed
        elif keep is not None and keep.shape[1] == 1 and keep.shape[0] > 1:
            if decision_on_host(keep):
                self.kept_rows = keep[:, 0].nonzero().squeeze(1).tolist()
                self.max_kept, self.all_kept = int(bool(self.kept_rows)), len(self.kept_rows) == keep.shape[0]
            else:
                self.masked, self.max_kept, self.all_kept = True, 1, False
        elif keep is not None and keep.numel() == 1:  # a batch-1 decode step: one bool to read
            self.all_kept = bool(keep)
            self.max_kept = int(self.all_kept)
        elif keep is not None:
            self.count_on_host(keep)

    def count_on_host(self, keep: torch.Tensor) -> None:
        """``max_kept`` and ``all_kept`` of ``keep`` (B, T), in one host read for both counts."""
        self.max_kept, n_kept = (int(v) for v in torch.stack([keep.sum(1).max(), keep.sum()]).tolist())
        self.all_kept = n_kept == keep.numel()


# --------------------------------------------------------------------------------------------
# Per-layer routing state (plain object, not a module: nothing here is a parameter)
# --------------------------------------------------------------------------------------------
class LayerRouting:
    """What the wrappers of one routed layer share.

    Attributes:
        observers: objects with ``observe(layer_idx, keep, scores, valid)`` (capacity tracking,
            calibration); empty in the hot path.
        last_capacity: STE capacity of the latest training forward (keeps the graph), read by
            the capacity regulariser.
        forced_keep: a fixed decision (``(B,)`` or ``(B, T)`` bool) instead of the router's, used
            by the attach-time probe; None in normal use.
        decision: what the attention wrapper decided in the layer's current forward; the MLP and
            branch-end wrappers, which run after it in the same forward, act on it.
        mask_sent: set when the model received a padding mask, cleared when the attention wrapper
            received it: a family whose decoder layer does not pass keyword arguments on to its
            attention is refused instead of averaging over padding.
        order: a one-element tensor the layer's compiled ops declare they mutate, which keeps its
            MLP op after its attention op (:mod:`routertune.routing.compiled`).
    """

    def __init__(self, layer_idx: int, target: str, unit: str, arch: ArchSpec) -> None:
        self.layer_idx = layer_idx
        self.target = target
        self.unit = unit
        self.arch = arch
        self.observers: list[Any] = []
        self.last_capacity: torch.Tensor | None = None
        self.forced_keep: torch.Tensor | None = None
        self.decision: Decision | None = None
        self.mask_sent = False
        self.order = torch.zeros(1)
        self.router: Router | None = None  # set by the attention wrapper

    def fixed_decision(self) -> bool | None:
        """True / False when the threshold fixes every unit's decision (<= 0 keeps, > 1 skips)
        and no forced decision replaces it; None when the scores decide."""
        if self.forced_keep is not None or self.router is None:
            return None
        return self.router.fixed_decision

    def static_decision(self) -> bool | None:
        """The fixed decision, where nobody observes the scores either: a compiled graph then
        holds the layer as plain or deleted (the decision is part of the model, like a deleted
        layer; the graph guards on it), not as an op."""
        return None if self.observers else self.fixed_decision()

    def notify(self, keep: torch.Tensor, scores: torch.Tensor | None, valid: torch.Tensor | None) -> None:
        for obs in self.observers:
            obs.observe(self.layer_idx, keep, scores, valid)


def strip_routing_kwargs(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the decoder layers that carry no router: routertune's keyword
    arguments never reach their attention kernels. (In routed layers the attention wrapper takes
    them; they travel as keyword arguments, not module state, so gradient checkpointing's
    recomputation, which calls the layer's forward without hooks, sees them too.)"""
    kwargs.pop(TOKEN_MASK_KWARG, None)
    kwargs.pop(ROUTING_MASK_KWARG, None)
    return args, kwargs


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------
class SubLayerWrapper(nn.Module):
    """PEFT-style: the original module as ``base_layer``; attribute reads fall through to it."""

    def __init__(self, base_layer: nn.Module, routing: LayerRouting) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.handle = compiled.register_wrapper(self)

    def __setstate__(self, state: dict) -> None:
        state.pop("_compiled_region", None)  # compiled for the original's module
        super().__setstate__(state)
        self.handle = compiled.register_wrapper(self)  # a copy is its own routed sub-layer

    def _plain(self, *args: Any, **kwargs: Any) -> Any:
        """The base module on the whole batch (every unit kept)."""
        return compiled.plain_call(self, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name == "base_layer" or not modules or "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], name)

    def _training(self) -> bool:
        """Whether this forward trains the routers (gated, every unit computed)."""
        return self.training and torch.is_grad_enabled()

    def _gate_here(self, part: str) -> bool:
        """Whether the training gate multiplies this sub-layer's output (else a branch-end module)."""
        return part not in self.routing.arch.branch_end


class RoutedAttention(SubLayerWrapper):
    """The layer's attention, and the place where the layer's routing decision is made.

    ``routes`` says whether attention itself is routed (``attn_*``, ``block_*``); for ``mlp_*``
    the wrapper only decides and runs its attention unchanged.
    """

    def __init__(self, base_layer: nn.Module, routing: LayerRouting, router: Router, routes: bool) -> None:
        super().__init__(base_layer, routing)
        self.router = router
        routing.router = router
        self.routes = routes
        self.output_arity = 2  # how many values the base attention returns (seen on each eager call)

    # ---- the decision ------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any):
        hidden = args[0] if args else kwargs["hidden_states"]
        r = self.routing
        token_mask = kwargs.pop(TOKEN_MASK_KWARG, None)
        routing_mask = kwargs.pop(ROUTING_MASK_KWARG, None)
        if r.mask_sent and token_mask is None:
            raise UnsupportedArchitectureError(
                f"layer {r.layer_idx}: the decoder layer did not pass keyword arguments on to its attention, "
                "so its router cannot see the padding mask"
            )
        r.mask_sent = False
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        if torch.compiler.is_compiling() and not self._training():
            return self._compiled_forward(hidden, token_mask, routing_mask, cache, args, kwargs)
        out = self.run_routed(hidden, token_mask, routing_mask, cache, args, kwargs)
        if isinstance(out, tuple):
            self.output_arity = len(out)
        return out

    def _compiled_forward(self, hidden, token_mask, routing_mask, cache, args: tuple, kwargs: dict):
        """What a compiled graph holds: the plain or deleted sub-layer where the threshold fixes
        the decision, else one opaque op (:mod:`routertune.routing.compiled`)."""
        static = self.routing.static_decision()
        if static is True or (static is False and not self.routes):  # kept, or not routed (mlp_*)
            return self.base_layer(*args, **kwargs)
        # (a token layer that skips every query still writes every token's keys/values: an op)
        if static is False and self.routing.unit == "sequence":
            return (torch.zeros_like(hidden), *([None] * (self.output_arity - 1)))
        return compiled.call_routed_attention(self, hidden, token_mask, routing_mask, cache, args, kwargs)

    def run_routed(self, hidden, token_mask, routing_mask, cache, args: tuple, kwargs: dict):
        """Decides and runs the layer's routed attention (eagerly; under compilation inside the
        op of :mod:`routertune.routing.compiled`)."""
        r = self.routing
        B, T, _ = hidden.shape
        valid = _valid_tokens(token_mask, B, T)
        if r.unit == "sequence":
            # sequence routers average over the decision tokens; token routers use ``valid``
            decide_on = _decision_tokens(valid, _valid_tokens(routing_mask, B, T))
        else:
            decide_on = valid
        if self._training():
            r.decision = self._gated(hidden, decide_on)
        elif r.unit == "sequence":
            r.decision = Decision(route=self._sequence_route(hidden, decide_on, cache))
        else:
            r.decision = Decision(
                keep=self._fixed_or_scored(hidden, decide_on, (B, T)), fixed=self.routing.fixed_decision()
            )
        if not self.routes:
            return self.base_layer(*args, **kwargs)
        return self._run(r.decision, hidden, cache, args, kwargs)

    def _scores(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Router scores: (B,) for sequences (mean over the ``valid`` decision tokens), (B, T)
        for tokens."""
        if self.routing.unit == "sequence":
            return self.router(masked_sequence_mean(x, valid))
        return self.router(x)

    def _keep(self, scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        r = self.routing
        keep = r.forced_keep.to(scores.device) if r.forced_keep is not None else self.router.keep(scores)
        if r.unit == "token" and valid is not None:
            keep = keep & valid  # padding tokens never need computing
        return keep

    def _fixed_or_scored(self, x, valid, shape) -> torch.Tensor:
        """The decision, without scoring where the threshold fixes it."""
        r = self.routing
        keep = None
        fixed = r.fixed_decision()
        if fixed is not None:
            keep = torch.full(shape, fixed, dtype=torch.bool, device=x.device)
        if keep is None or r.observers:
            scores = self._scores(x, valid)
            keep = self._keep(scores, valid) if keep is None else keep
            r.notify(keep, scores, valid if r.unit == "token" else None)
        return keep

    def _sequence_route(self, x, valid, cache) -> SequenceRoute:
        store = routes_of(cache)
        idx = self.routing.layer_idx
        if store is not None and idx in store:
            return store[idx]  # decided at prefill; reused for every decode step
        route = SequenceRoute.from_keep(
            self._fixed_or_scored(x, valid, (x.shape[0],)), fixed=self.routing.fixed_decision()
        )
        if store is not None:
            store[idx] = route
        return route

    def _gated(self, x, valid) -> Decision:
        r = self.routing
        scores = self._scores(x, valid)
        keep = self._keep(scores, valid)
        r.notify(keep, scores, valid if r.unit == "token" else None)
        gate = straight_through_gate(scores, keep)  # (B,) or (B, T)
        if r.unit == "token" and valid is not None:
            w = valid.to(gate.dtype)
            r.last_capacity = (gate * w).sum() / w.sum().clamp(min=1.0)
        else:
            r.last_capacity = gate.mean()
        g = gate.view(-1, 1, 1) if r.unit == "sequence" else gate.unsqueeze(-1)
        return Decision(gate=g.to(x.dtype))

    # ---- routed attention ----------------------------------------------------------------
    def _run(self, d: Decision, hidden: torch.Tensor, cache: Any, args: tuple, kwargs: dict):
        if d.gate is not None:
            out, *rest = self.base_layer(*args, **kwargs)
            return (out * d.gate if self._gate_here("attn") else out, *rest)
        if d.route is not None:
            return self._run_rows(d.route, hidden, args, kwargs)
        return self._run_tokens(d, hidden, cache, args, kwargs)

    def _run_rows(self, route: SequenceRoute, hidden, args, kwargs):
        if route.all_kept:
            return self._plain(*args, **kwargs)
        if route.none_kept:
            return torch.zeros_like(hidden), None  # not called: its cache layer stays empty
        rows, B = route.kept_rows, hidden.shape[0]
        sub = _rows_of_call(args, kwargs, route)
        if sub is None:  # a mask we cannot slice by rows: compute all, zero the skipped rows
            out, *rest = self.base_layer(*args, **kwargs)
            return (out * route.keep.view(-1, 1, 1).to(out.dtype), *rest)
        out, *rest = self.base_layer(*sub[0], **sub[1])
        return (_scatter(out, rows, B), *rest)

    def _run_tokens(self, d: Decision, hidden, cache, args, kwargs):
        if d.all_kept:
            return self._plain(*args, **kwargs)
        if d.masked:
            out, *rest = self._plain(*args, **kwargs)
            return (_zero_skipped(out, d.keep), *rest)
        attn, spec = self.base_layer, self.routing.arch
        mask = kwargs.get("attention_mask")
        pos = kwargs.get("position_embeddings")
        if pos is not None and supports_kept_queries(attn, spec) and masks.rows_selectable(mask):
            if d.max_kept == 0:
                # Keys/values are still written so the cache stays complete for later tokens.
                keys_and_values(attn, spec, hidden, pos, cache)
                return torch.zeros_like(hidden), None
            if d.kept_rows is not None:
                return kept_row_attention(attn, spec, hidden, d.kept_rows, mask, pos, cache), None
            out = kept_query_attention(attn, spec, hidden, d.keep, d.max_kept, mask, pos, cache)
            return out, None
        out, *rest = self.base_layer(*args, **kwargs)  # every query; the cache gets every token
        return (_zero_skipped(out, d.keep), *rest)


class RoutedMLP(SubLayerWrapper):
    """The layer's MLP, skipped on the decision its attention wrapper made in this forward."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.compiler.is_compiling() and not args and not kwargs and not self._training():
            static = self.routing.static_decision()
            if static is not None:  # kept / skipped by the threshold: plain or deleted in the graph
                return self.base_layer(x) if static else torch.zeros_like(x)
            return compiled.call_routed_mlp(self, x)
        return self.run_routed(x, *args, **kwargs)

    def run_routed(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        d = self.routing.decision
        if d is None:
            raise UnsupportedArchitectureError(
                f"the MLP of layer {self.routing.layer_idx} ran before its attention decided "
                "(routertune needs the attention to run first in each decoder layer)"
            )
        if d.gate is not None:
            out = self.base_layer(x, *args, **kwargs)
            return out * d.gate if self._gate_here("mlp") else out
        if d.route is not None:
            route = d.route
            if route.all_kept:
                return self._plain(x, *args, **kwargs)
            if route.none_kept:
                return torch.zeros_like(x)
            rows = route.kept_rows
            return _scatter(self.base_layer(x.index_select(0, rows), *args, **kwargs), rows, x.shape[0])
        if d.all_kept:
            return self._plain(x, *args, **kwargs)
        if d.masked:
            return _zero_skipped(self._plain(x, *args, **kwargs), d.keep)
        if d.max_kept == 0:
            return torch.zeros_like(x)
        B, T, C = x.shape
        idx = d.keep.reshape(-1).nonzero().squeeze(1)  # (N,) flat kept tokens
        out = self.base_layer(x.reshape(B * T, C).index_select(0, idx), *args, **kwargs)  # (N, C')
        return _scatter(out, idx, B * T).view(B, T, -1)


class BranchGate(SubLayerWrapper):
    """A family's post-norm at the end of a routed branch: applies the training gate after it.

    An RMSNorm is (nearly) blind to a scalar gate in front of it, so the straight-through
    gradient must be taken after the norm. Outside training it just runs the norm (which maps a
    skipped sub-layer's zeros to zeros; the probe checks that).
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not self._training():
            return out  # the gate exists only in training (read nothing a compiled graph would guard on)
        d = self.routing.decision
        if d is not None and d.gate is not None:
            return out * d.gate
        return out


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _scatter(out: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``out`` (rows ``index`` of a batch of ``size``) placed into zeros: skipped rows add nothing."""
    return out.new_zeros(size, *out.shape[1:]).index_copy(0, index, out)


def _zero_skipped(out: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``out`` (B, T, C) with the tokens that ``keep`` (B, T) skips set to 0 (not multiplied:
    a skipped token adds nothing even where its computed update is not finite)."""
    return torch.where(keep.unsqueeze(-1), out, 0.0)


def _select_rows(value: Any, rows: torch.Tensor, batch_size: int) -> Any:
    """Rows of a per-batch tensor or flex BlockMask (or tuple of them); broadcast (batch 1)
    values pass through."""
    if masks.is_block_mask(value):
        return masks.select_mask_rows(value, rows, batch_size)
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch_size and batch_size > 1:
            return value.index_select(0, rows)
        return value
    if isinstance(value, tuple):
        return tuple(_select_rows(v, rows, batch_size) for v in value)
    return value


def _rows_of_call(args: tuple, kwargs: dict, route: SequenceRoute):
    """The attention call's arguments restricted to the route's kept rows; None if the mask
    cannot be sliced."""
    if not masks.rows_selectable(kwargs.get("attention_mask")):
        return None
    rows, batch_size = route.kept_rows, route.keep.shape[0]
    sub_args = tuple(_select_rows(a, rows, batch_size) for a in args)
    sub_kwargs = {}
    for k, v in kwargs.items():
        if k in CACHE_KWARGS and v is not None:
            sub_kwargs[k] = RowsOfCache(v, route)
        else:
            sub_kwargs[k] = _select_rows(v, rows, batch_size)
    return sub_args, sub_kwargs


def _valid_tokens(token_mask: Any, batch: int, length: int) -> torch.Tensor | None:
    """(B, T) bool of real (non-padding) tokens of this forward, or None when all are real."""
    if not isinstance(token_mask, torch.Tensor) or token_mask.dim() != 2 or token_mask.shape[0] != batch:
        return None
    if token_mask.shape[1] < length:
        return None
    return token_mask[:, -length:].bool()


def _decision_tokens(valid: torch.Tensor | None, routing: torch.Tensor | None) -> torch.Tensor | None:
    """Tokens a sequence router averages over: real tokens inside the routing mask.

    A row whose routing mask selects no real token falls back to all its real tokens, so every
    sequence is decided on something.
    """
    if routing is None:
        return valid
    chosen = routing if valid is None else routing & valid
    empty = ~chosen.any(dim=1, keepdim=True)  # (B, 1)
    if bool(empty.any()):
        fallback = valid if valid is not None else torch.ones_like(chosen)
        chosen = torch.where(empty, fallback, chosen)
    return chosen

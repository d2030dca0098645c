"""Routed decoder layers: skipped sub-layers are not computed.

A routed layer is the model's own decoder layer with its class swapped for a subclass
(``Routed<Original>``), so gradient checkpointing, output capture and ``isinstance`` checks of
transformers keep working. Per forward it:

1. normalises the input (``input_layernorm``) and asks its router which units to keep;
2. in training (``module.training`` and grad enabled) computes every unit and applies the
   hard 0/1 gate through a straight-through estimator, so routers of skipped units still get a
   gradient;
3. otherwise computes only the kept units:
   * ``*_sequence``: the kept rows are gathered, run, and added back; a sub-layer that every
     row skips is not called at all. Routes are decided at prefill and stored on the request's
     KV cache, so every decode step reuses them and a layer skipped by the whole batch never
     writes KV.
   * ``*_token``: the MLP runs on the kept tokens only; attention computes keys/values for all
     tokens (so the cache and every later token see the same context as in training) but
     queries, the attention kernel and the output projection only for kept tokens.

See docs/design.md for the measurements behind these choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from routertune.arch import ArchSpec
from routertune.router import Router, masked_sequence_mean, straight_through_gate

# Keyword argument that carries the 2-D padding mask from the base model to every layer.
TOKEN_MASK_KWARG = "routertune_token_mask"
# Keyword argument that carries an optional 2-D mask of the tokens a sequence router decides on
# (e.g. the prompt only, not the answer being scored or learnt); padding is excluded anyway.
ROUTING_MASK_KWARG = "routertune_routing_mask"
# Attribute under which a KV cache object carries the per-layer sequence routes of its request.
ROUTES_ATTR = "_routertune_routes"


# --------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------
@dataclass
class SequenceRoute:
    """One layer's per-sequence decision, with the host-side facts needed to act on it.

    The host facts are computed once (one device sync) when the route is made, so decode steps
    that reuse the route never synchronise.
    """

    keep: torch.Tensor  # (B,) bool
    kept_rows: torch.Tensor | None  # (K,) long, only when some but not all rows are kept
    all_kept: bool
    none_kept: bool

    @classmethod
    def from_keep(cls, keep: torch.Tensor) -> SequenceRoute:
        n_kept = int(keep.sum())
        batch = keep.shape[0]
        mixed = 0 < n_kept < batch
        rows = keep.nonzero().squeeze(1) if mixed else None
        return cls(keep=keep, kept_rows=rows, all_kept=n_kept == batch, none_kept=n_kept == 0)


class RouteStore(dict):
    """Per-request routes, keyed by layer index, kept on the request's cache object.

    Batch-reshaping cache operations used by generate() (beam reordering, repeats, selection)
    are mirrored onto the routes so they always describe the cache's rows.
    """

    def apply(self, fn) -> None:
        for idx, route in list(self.items()):
            self[idx] = SequenceRoute.from_keep(fn(route.keep))


def routes_of(cache: Any, create: bool = True) -> RouteStore | None:
    """The route store of a cache (created and wired into the cache on first use)."""
    if cache is None:
        return None
    store = getattr(cache, ROUTES_ATTR, None)
    if store is None and create:
        store = RouteStore()
        setattr(cache, ROUTES_ATTR, store)
        _mirror_batch_ops(cache, store)
    return store


def _mirror_batch_ops(cache: Any, store: RouteStore) -> None:
    def wrap(name: str, transform) -> None:
        original = getattr(cache, name, None)
        if original is None:
            return

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            store.apply(lambda keep: transform(keep, *args, **kwargs))
            return out

        setattr(cache, name, wrapped)

    wrap("reorder_cache", lambda keep, beam_idx, *a, **k: keep.index_select(0, beam_idx.to(keep.device)))
    wrap("batch_select_indices", lambda keep, indices, *a, **k: keep[indices.to(keep.device)])
    wrap("batch_repeat_interleave", lambda keep, repeats, *a, **k: keep.repeat_interleave(repeats, dim=0))


# --------------------------------------------------------------------------------------------
# Per-layer routing state (plain object, not a module: nothing here is a parameter)
# --------------------------------------------------------------------------------------------
class LayerRouting:
    """What a routed layer needs besides its router.

    Attributes:
        observers: objects with ``observe(layer_idx, keep, scores, valid)`` (capacity tracking,
            calibration); empty in the hot path.
        last_capacity: STE capacity of the latest training forward (keeps the graph), read by
            the capacity regulariser.
    """

    def __init__(self, layer_idx: int, target: str, unit: str, arch: ArchSpec) -> None:
        self.layer_idx = layer_idx
        self.target = target
        self.unit = unit
        self.arch = arch
        self.observers: list[Any] = []
        self.last_capacity: torch.Tensor | None = None

    def notify(self, keep: torch.Tensor, scores: torch.Tensor | None, valid: torch.Tensor | None) -> None:
        for obs in self.observers:
            obs.observe(self.layer_idx, keep, scores, valid)


# --------------------------------------------------------------------------------------------
# Sub-layer execution on a subset of rows / tokens
# --------------------------------------------------------------------------------------------
class RowsOfCache:
    """Presents rows ``rows`` of a batch-wide KV cache to an attention run on those rows only.

    The kept rows' keys/values are written into a zero-filled batch-wide tensor so that every
    row of the cache keeps the same length (one causal mask per forward is sized from it); the
    skipped rows' entries are never read because their route is reused at every decode step.
    """

    def __init__(self, cache: Any, rows: torch.Tensor, batch_size: int) -> None:
        self._cache = cache
        self._rows = rows
        self._batch_size = batch_size

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        full_shape = (self._batch_size, *key_states.shape[1:])
        keys = key_states.new_zeros(full_shape).index_copy_(0, self._rows, key_states)
        values = value_states.new_zeros(full_shape).index_copy_(0, self._rows, value_states)
        keys, values = self._cache.update(keys, values, layer_idx, *args, **kwargs)
        return keys.index_select(0, self._rows), values.index_select(0, self._rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def _select_rows(value: Any, rows: torch.Tensor, batch_size: int) -> Any:
    """Rows of a per-batch tensor (or tuple of them); broadcast (batch 1) values pass through."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch_size and batch_size > 1:
            return value.index_select(0, rows)
        return value
    if isinstance(value, tuple):
        return tuple(_select_rows(v, rows, batch_size) for v in value)
    return value


def _rows_selectable(attention_mask: Any) -> bool:
    return attention_mask is None or isinstance(attention_mask, torch.Tensor)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, Llama layout. x: (B, H, T, D); cos/sin: (B|1, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def attention_for_kept_tokens(
    layer: nn.Module,
    normed: torch.Tensor,
    keep: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: Any,
    kwargs: dict[str, Any],
    max_kept: int,
) -> torch.Tensor:
    """Self-attention output for the kept tokens only (zeros at skipped tokens).

    Keys and values are computed for every token and written to the cache; queries, the
    attention kernel and the output projection only for kept tokens. Rows are padded to the
    largest kept count ``max_kept``; padded query slots sit on skipped positions and are zeroed.

    Args:
        normed: ``(B, T, C)`` input-layernormed hidden states.
        keep: ``(B, T)`` bool.
        attention_mask: the layer's mask ``(B|1, 1, T, S)`` (bool or additive) or None (causal).
        max_kept: ``keep.sum(1).max()``, already on the host.

    Returns:
        ``(B, T, C)`` attention update.
    """
    attn = layer.self_attn
    arch: ArchSpec = layer.routing.arch
    B, T, C = normed.shape
    hd = attn.head_dim

    k = attn.k_proj(normed).view(B, T, -1, hd).transpose(1, 2)  # (B, Hkv, T, D)
    v = attn.v_proj(normed).view(B, T, -1, hd).transpose(1, 2)
    if arch.qk_norm:
        k = attn.k_norm(k)
    cos, sin = position_embeddings  # (B|1, T, D)
    k = _apply_rotary(k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
    S = k.shape[2]

    # Kept positions first (in order), then skipped ones: order[:, :max_kept] holds every kept
    # token of each row, padded with distinct skipped positions.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :max_kept]  # (B, n)
    valid = keep.gather(1, order)  # (B, n)
    xq = normed.gather(1, order.unsqueeze(-1).expand(-1, -1, C))  # (B, n, C)
    q = attn.q_proj(xq).view(B, max_kept, -1, hd).transpose(1, 2)  # (B, H, n, D)
    if arch.qk_norm:
        q = attn.q_norm(q)
    d = cos.shape[-1]
    pos_idx = order.unsqueeze(-1).expand(-1, -1, d)
    q = _apply_rotary(q, cos.expand(B, -1, -1).gather(1, pos_idx), sin.expand(B, -1, -1).gather(1, pos_idx))

    if attention_mask is None:
        # transformers omits the mask when plain causal attention is exact; queries are no
        # longer the last T positions in order, so spell the causal mask out.
        query_pos = order + (S - T)  # (B, n) absolute positions within the keys
        key_pos = torch.arange(S, device=normed.device)
        mask = key_pos.view(1, 1, 1, S) <= query_pos.view(B, 1, max_kept, 1)  # (B, 1, n, S)
    else:
        m = attention_mask.expand(B, -1, -1, -1)
        mask = m.gather(2, order.view(B, 1, max_kept, 1).expand(-1, m.shape[1], -1, m.shape[-1]))

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = attn.config._attn_implementation
    interface = ALL_ATTENTION_FUNCTIONS[impl] if impl != "eager" else _eager_attention(attn)
    out, _ = interface(
        attn,
        q,
        k,
        v,
        mask,
        dropout=0.0,
        scaling=attn.scaling,
        sliding_window=arch.sliding_window(attn),
        **kwargs,
    )
    out = attn.o_proj(out.reshape(B, max_kept, -1))  # (B, n, C)
    out = torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
    update = normed.new_zeros(B, T, C)
    return update.scatter(1, order.unsqueeze(-1).expand(-1, -1, C), out.to(update.dtype))


def _eager_attention(attn: nn.Module):
    module = __import__(type(attn).__module__, fromlist=["eager_attention_forward"])
    return module.eager_attention_forward


def kept_query_attention_supported(layer: nn.Module) -> bool:
    """Whether queries can be restricted to kept tokens for this layer (else all are computed)."""
    attn = layer.self_attn
    return (
        layer.routing.arch.kept_query_attention
        and attn.config._attn_implementation in ("sdpa", "eager")
        and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
    )


# --------------------------------------------------------------------------------------------
# The routed layer
# --------------------------------------------------------------------------------------------
class RoutedLayerMixin:
    """Mixed in front of a decoder layer class; see the module docstring.

    Layers of a routed model that carry no router also get this class (with ``router=None``)
    so that the padding-mask keyword never reaches an attention kernel.
    """

    router: Router | None
    routing: LayerRouting | None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Any = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        token_mask = kwargs.pop(TOKEN_MASK_KWARG, None)
        routing_mask = kwargs.pop(ROUTING_MASK_KWARG, None)
        if "past_key_values" in kwargs:  # old name, still accepted by transformers 5.x
            cache = kwargs.pop("past_key_values")
        attn_kwargs = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.router is None:
            return super().forward(hidden_states, **attn_kwargs)

        B, T, _ = hidden_states.shape
        valid = _valid_tokens(token_mask, B, T)
        normed = self.input_layernorm(hidden_states)
        if self.routing.unit == "sequence":
            # sequence routers average over the decision tokens; token routers use ``valid``
            valid = _decision_tokens(valid, _valid_tokens(routing_mask, B, T))
        if self.training and torch.is_grad_enabled():
            return self._forward_gated(hidden_states, normed, valid, attn_kwargs)
        if self.routing.unit == "sequence":
            return self._forward_sequence(hidden_states, normed, valid, attn_kwargs)
        return self._forward_token(hidden_states, normed, valid, attn_kwargs)

    # ---- decisions -------------------------------------------------------------------------
    def _scores_and_keep(self, normed: torch.Tensor, valid: torch.Tensor | None):
        """Router scores and hard decisions: (B,) for sequences, (B, T) for tokens."""
        if self.routing.unit == "sequence":
            scores = self.router(masked_sequence_mean(normed, valid))  # (B,)
            return scores, self.router.keep(scores)
        scores = self.router(normed)  # (B, T)
        keep = self.router.keep(scores)
        if valid is not None:
            keep = keep & valid  # padding tokens never need computing
        return scores, keep

    def _fixed_keep(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        """Decision known without scoring: threshold <= 0 keeps all, > 1 skips all."""
        if self.router.threshold <= 0.0:
            return torch.ones(shape, dtype=torch.bool, device=device)
        if self.router.threshold > 1.0:
            return torch.zeros(shape, dtype=torch.bool, device=device)
        return None

    # ---- training: compute everything, gate with the straight-through estimator -------------
    def _forward_gated(self, hidden_states, normed, valid, attn_kwargs) -> torch.Tensor:
        scores, keep = self._scores_and_keep(normed, valid)
        self.routing.notify(keep, scores, valid if self.routing.unit == "token" else None)
        gate = straight_through_gate(scores, keep)  # (B,) or (B, T)
        if self.routing.unit == "sequence":
            self.routing.last_capacity = gate.mean()
            g = gate.view(-1, 1, 1)
        else:
            if valid is None:
                self.routing.last_capacity = gate.mean()
            else:
                w = valid.to(gate.dtype)
                self.routing.last_capacity = (gate * w).sum() / w.sum().clamp(min=1.0)
            g = gate.unsqueeze(-1)
        g = g.to(hidden_states.dtype)
        residual = hidden_states
        target = self.routing.target
        attn_out = self.self_attn(hidden_states=normed, **attn_kwargs)[0]
        if target == "attn":
            h = residual + g * attn_out
            return h + self.mlp(self.post_attention_layernorm(h))
        h = residual + attn_out
        mlp_out = self.mlp(self.post_attention_layernorm(h))
        if target == "mlp":
            return h + g * mlp_out
        full = h + mlp_out  # block
        return residual + g * (full - residual)

    # ---- inference, one decision per sequence ----------------------------------------------
    def _sequence_route(self, normed, valid, cache) -> SequenceRoute:
        store = routes_of(cache)
        idx = self.routing.layer_idx
        if store is not None and idx in store:
            return store[idx]  # decided at prefill; reused for every decode step
        B = normed.shape[0]
        keep = self._fixed_keep((B,), normed.device)
        if keep is None or self.routing.observers:
            scores, scored_keep = self._scores_and_keep(normed, valid)
            keep = scored_keep if keep is None else keep
            self.routing.notify(keep, scores, None)
        route = SequenceRoute.from_keep(keep)
        if store is not None:
            store[idx] = route
        return route

    def _forward_sequence(self, hidden_states, normed, valid, attn_kwargs) -> torch.Tensor:
        route = self._sequence_route(normed, valid, attn_kwargs["cache"])
        target = self.routing.target
        if target == "block":
            if route.none_kept:
                return hidden_states
            if route.all_kept:
                return self._plain_block(hidden_states, normed, attn_kwargs)
            rows = route.kept_rows
            sub = self._row_kwargs(attn_kwargs, rows, hidden_states.shape[0])
            if sub is None:  # a mask we cannot slice by rows: compute all, keep the kept rows
                full = self._plain_block(hidden_states, normed, attn_kwargs)
                return torch.where(route.keep.view(-1, 1, 1), full, hidden_states)
            out = self._plain_block(hidden_states.index_select(0, rows), normed.index_select(0, rows), sub)
            return hidden_states.index_copy(0, rows, out)

        # attention
        if target == "attn" and not route.all_kept:
            h = self._attention_on_rows(hidden_states, normed, route, attn_kwargs)
        else:
            h = hidden_states + self.self_attn(hidden_states=normed, **attn_kwargs)[0]
        # mlp
        if target == "mlp" and not route.all_kept:
            if route.none_kept:
                return h
            rows = route.kept_rows
            h_rows = h.index_select(0, rows)
            return h.index_copy(0, rows, h_rows + self.mlp(self.post_attention_layernorm(h_rows)))
        return h + self.mlp(self.post_attention_layernorm(h))

    def _attention_on_rows(self, hidden_states, normed, route: SequenceRoute, attn_kwargs) -> torch.Tensor:
        if route.none_kept:
            return hidden_states  # attention is not called; its cache layer stays empty
        rows = route.kept_rows
        sub = self._row_kwargs(attn_kwargs, rows, hidden_states.shape[0])
        if sub is None:
            out = self.self_attn(hidden_states=normed, **attn_kwargs)[0]
            return hidden_states + out * route.keep.view(-1, 1, 1).to(out.dtype)
        out = self.self_attn(hidden_states=normed.index_select(0, rows), **sub)[0]
        return hidden_states.index_add(0, rows, out)

    @staticmethod
    def _row_kwargs(
        attn_kwargs: dict[str, Any], rows: torch.Tensor, batch_size: int
    ) -> dict[str, Any] | None:
        """Attention arguments restricted to ``rows``; None if the mask cannot be sliced."""
        if not _rows_selectable(attn_kwargs["attention_mask"]):
            return None
        sub = {k: _select_rows(v, rows, batch_size) for k, v in attn_kwargs.items() if k != "cache"}
        cache = attn_kwargs["cache"]
        sub["cache"] = RowsOfCache(cache, rows, batch_size) if cache is not None else None
        return sub

    def _plain_block(self, hidden_states, normed, attn_kwargs) -> torch.Tensor:
        h = hidden_states + self.self_attn(hidden_states=normed, **attn_kwargs)[0]
        return h + self.mlp(self.post_attention_layernorm(h))

    # ---- inference, one decision per token --------------------------------------------------
    def _forward_token(self, hidden_states, normed, valid, attn_kwargs) -> torch.Tensor:
        B, T, C = hidden_states.shape
        keep = self._fixed_keep((B, T), normed.device)
        if keep is None or self.routing.observers:
            scores, scored_keep = self._scores_and_keep(normed, valid)
            keep = scored_keep if keep is None else keep
            self.routing.notify(keep, scores, valid)
        max_kept, n_kept = (int(v) for v in torch.stack([keep.sum(1).max(), keep.sum()]).tolist())
        target = self.routing.target
        all_kept = n_kept == B * T

        if target in ("attn", "block") and not all_kept:
            h = hidden_states + self._token_attention(normed, keep, max_kept, attn_kwargs)
        else:
            h = hidden_states + self.self_attn(hidden_states=normed, **attn_kwargs)[0]

        if target == "attn" or all_kept:
            return h + self.mlp(self.post_attention_layernorm(h))
        if n_kept == 0:
            return h
        idx = keep.reshape(-1).nonzero().squeeze(1)  # (N,) flat kept tokens
        flat = h.reshape(B * T, C)
        rows = flat.index_select(0, idx)
        return flat.index_add(0, idx, self.mlp(self.post_attention_layernorm(rows))).view(B, T, C)

    def _token_attention(self, normed, keep, max_kept, attn_kwargs) -> torch.Tensor:
        cache = attn_kwargs["cache"]
        mask = attn_kwargs["attention_mask"]
        if kept_query_attention_supported(self) and _rows_selectable(mask):
            extra = {
                k: v
                for k, v in attn_kwargs.items()
                if k not in ("attention_mask", "cache", "position_embeddings", "position_ids", "use_cache")
            }
            if max_kept == 0:
                # Keys/values are still written so the cache stays complete for later tokens.
                self._write_kv_only(normed, attn_kwargs)
                return torch.zeros_like(normed)
            return attention_for_kept_tokens(
                self, normed, keep, mask, attn_kwargs["position_embeddings"], cache, extra, max_kept
            )
        out = self.self_attn(hidden_states=normed, **attn_kwargs)[0]
        return out * keep.unsqueeze(-1).to(out.dtype)

    def _write_kv_only(self, normed, attn_kwargs) -> None:
        """Keys/values of tokens whose attention is skipped, for the cache only."""
        cache = attn_kwargs["cache"]
        if cache is None:
            return
        attn = self.self_attn
        B, T, _ = normed.shape
        hd = attn.head_dim
        k = attn.k_proj(normed).view(B, T, -1, hd).transpose(1, 2)
        v = attn.v_proj(normed).view(B, T, -1, hd).transpose(1, 2)
        if self.routing.arch.qk_norm:
            k = attn.k_norm(k)
        cos, sin = attn_kwargs["position_embeddings"]
        cache.update(_apply_rotary(k, cos, sin), v, attn.layer_idx)


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


def routed_class(base_cls: type) -> type:
    """``Routed<Base>``: the mixin in front of the model's own decoder layer class (cached)."""
    cls = _ROUTED_CLASSES.get(base_cls)
    if cls is None:
        cls = type(f"Routed{base_cls.__name__}", (RoutedLayerMixin, base_cls), {"_routertune_base": base_cls})
        _ROUTED_CLASSES[base_cls] = cls
    return cls


_ROUTED_CLASSES: dict[type, type] = {}

"""Per-request sequence routes, kept on the request's KV cache.

``*_sequence`` routers decide once, at prefill, and every decode step of that request reuses
the decision: a layer must either always or never write KV for a request (one causal mask per
forward is sized from the cache), and reusing the route needs no device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

# Attribute under which a KV cache object carries the per-layer sequence routes of its request.
ROUTES_ATTR = "_routertune_routes"


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
    def from_keep(cls, keep: torch.Tensor, fixed: bool | None = None) -> SequenceRoute:
        """The route of ``keep``; ``fixed`` (every row kept / skipped, known on the host) spares
        the device sync."""
        batch = keep.shape[0]
        n_kept = (batch if fixed else 0) if fixed is not None else int(keep.sum())
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

    # ``reset()`` readies a cache for a new request (transformers' recipe for reusing a static
    # cache under torch.compile): that request is routed anew, on its own prompt.
    original_reset = getattr(cache, "reset", None)
    if original_reset is not None:

        def reset(*args, **kwargs):
            out = original_reset(*args, **kwargs)
            store.clear()
            _restore_plain_layers(cache)
            return out

        cache.reset = reset


def _restore_plain_layers(cache: Any) -> None:
    """Puts each compact layer of ``cache`` back as an empty layer of its transformers class."""
    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers if isinstance(layers, list) else []):
        if isinstance(layer, CompactRows):
            plain_class = next(b for b in type(layer).__mro__ if not issubclass(b, CompactRows))
            plain = plain_class.__new__(plain_class)
            plain.__dict__.update({k: v for k, v in vars(layer).items() if k != "row_keep"})
            plain.keys = plain.values = None
            plain.is_initialized = False
            layers[i] = plain


class CompactRows:
    """A dynamic cache layer that holds the keys/values of the KEPT rows of a mixed sequence
    route only: ``(K, Hkv, S, D)`` for the ``K`` rows of ``row_keep``, in batch order.

    The route is fixed per request, so the layer's rows never change between decode steps: a
    kept-rows attention reads this layer's whole cache as it is (no per-step gather) and the
    skipped rows cost no KV memory. The batch-reshaping cache operations generate() calls act on
    batch rows; these overrides translate them to the layer's compact rows (and carry
    ``row_keep`` along, as :class:`RouteStore` carries the routes). :func:`compact_layer` puts the
    compact form of a layer's class (``COMPACT_LAYER_CLASSES``) in its place.
    """

    row_keep: torch.Tensor  # (B,) bool: the batch rows this layer holds

    def _select_batch_rows(self, index: torch.Tensor) -> None:
        """Keeps batch rows ``index`` (long, in their new order) of the batch."""
        keep = self.row_keep
        index = index.to(keep.device)
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        new_keep = keep.index_select(0, index)
        if self.is_initialized and self.keys.numel():
            position = keep.long().cumsum(0) - 1  # each batch row's compact row (where kept)
            source = position.index_select(0, index)[new_keep].to(self.keys.device)
            self.keys = self.keys.index_select(0, source)
            self.values = self.values.index_select(0, source)
        self.row_keep = new_keep

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        # each kept row's copies stay together, in batch order, as the kept rows of the new batch
        self.row_keep = self.row_keep.repeat_interleave(repeats, dim=0)
        if self.is_initialized and self.keys.numel():
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)


class CompactDynamicLayer(CompactRows, DynamicLayer):
    """A ``DynamicLayer`` holding the kept rows of a mixed route."""


class CompactSlidingWindowLayer(CompactRows, DynamicSlidingWindowLayer):
    """A ``DynamicSlidingWindowLayer`` holding the kept rows of a mixed route."""


# transformers layer class -> its compact form. Only these exact classes (plain concatenating
# dynamic layers) are compacted; any other layer (static, quantized, offloaded subclasses, a
# user's own) keeps a batch-wide buffer with zero rows for the skipped rows. A benchmark empties
# this table to measure the zero-row design.
COMPACT_LAYER_CLASSES: dict[type, type] = {
    DynamicLayer: CompactDynamicLayer,
    DynamicSlidingWindowLayer: CompactSlidingWindowLayer,
}


def compact_layer(cache: Any, layer_idx: int, keep: torch.Tensor) -> CompactRows | None:
    """The compact layer ``layer_idx`` of ``cache`` for the route ``keep``: made from the
    layer while it holds nothing yet, else the one made at prefill; None when the layer is
    not of a compactable class (the caller then writes zero rows)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return None
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while replicate is not None and len(layers) <= layer_idx:  # what Cache.update would append
        layers.append(replicate())
    if layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if isinstance(layer, CompactRows):
        if layer.row_keep.shape != keep.shape:
            raise RuntimeError(
                f"layer {layer_idx}: its compact KV cache holds rows of a batch of {layer.row_keep.shape[0]}, "
                f"the forward has {keep.shape[0]} (a cache batch operation that routertune does not mirror?)"
            )
        return layer
    compact = COMPACT_LAYER_CLASSES.get(type(layer))
    if compact is None or layer.is_initialized:
        return None
    # the same layer's state (sliding window, device, ...) in the compact class; nothing else
    # holds the empty layer, the cache's list is its owner
    layers[layer_idx] = replacement = compact.__new__(compact)
    replacement.__dict__.update(vars(layer))
    replacement.row_keep = keep
    return replacement


class RowsOfCache:
    """Presents a batch-wide KV cache to an attention run on the kept rows of a mixed route.

    Where the cache layer is a plain dynamic one, it becomes a :class:`CompactRows` layer that
    holds the kept rows alone, so updates pass straight through. Otherwise (a static cache,
    whose buffers are batch-wide) the kept rows' keys/values are written into a zero-filled
    batch-wide tensor so that every row keeps the same length (one causal mask per forward is
    sized from it), and the kept rows are gathered back; the skipped rows' entries are never
    read because their route is reused at every decode step. docs/design.md has the numbers.
    """

    def __init__(self, cache: Any, route: SequenceRoute) -> None:
        self._cache = cache
        self._route = route  # a mixed route: kept_rows is set

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keep, rows = self._route.keep, self._route.kept_rows
        if compact_layer(self._cache, layer_idx, keep) is not None:
            return self._cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        full_shape = (keep.shape[0], *key_states.shape[1:])
        keys = key_states.new_zeros(full_shape).index_copy_(0, rows, key_states)
        values = value_states.new_zeros(full_shape).index_copy_(0, rows, value_states)
        keys, values = self._cache.update(keys, values, layer_idx, *args, **kwargs)
        return keys.index_select(0, rows), values.index_select(0, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

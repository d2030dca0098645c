"""Per-request sequence routes, kept on the request's KV cache.

``*_sequence`` routers decide once, at prefill, and every decode step of that request reuses
the decision: a layer must either always or never write KV for a request (one causal mask per
forward is sized from the cache), and reusing the route needs no device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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

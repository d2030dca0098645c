"""KV-cache accounting: the bytes a transformers cache holds, and its length per layer.

A layer whose attention the whole batch skipped writes nothing to the cache, so these numbers
show the memory routing saves. Routing itself needs nothing special from ``generate()``:
sequence routes are decided at prefill and stored on the request's cache
(:mod:`routertune.routing.routes`), so every generation strategy that builds a fresh cache per
call (greedy, sampling, beam search) gets consistent routes.
"""

from __future__ import annotations

from typing import Any

import torch


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a transformers Cache (0 for None).

    Layers that never wrote (attention skipped by the whole batch) hold nothing.
    """
    if cache is None:
        return 0
    return sum(kv_layer_bytes(layer) for layer in getattr(cache, "layers", []))


def kv_layer_bytes(layer: Any) -> int:
    """Bytes held by one cache layer's key/value tensors (0 where it stored nothing)."""
    tensors = (getattr(layer, name, None) for name in ("keys", "values"))
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def kv_cache_layer_lengths(cache: Any) -> list[int]:
    """Cached sequence length per layer (0 where the layer stored nothing)."""
    out = []
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        out.append(int(keys.shape[-2]) if isinstance(keys, torch.Tensor) and keys.numel() else 0)
    return out

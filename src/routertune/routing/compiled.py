"""Routed sub-layers under ``torch.compile``: one opaque op per routed sub-layer.

A compiled graph cannot branch on data without either reading it at trace time (a guard: one
graph per route pattern, so every new combination of skipped layers recompiles, up to dynamo's
limit of 8 and then eager) or tracing both branches (``torch.cond``, which refuses the KV-cache
write inside the attention branch). So under compilation each routed sub-layer is one custom
op, ``routertune::routed_attention`` / ``routertune::routed_mlp``, whose body is the eager
wrapper code (decision, row slicing, skipping, the route stored on the cache). The compiler
compiles everything around it; the graph holds no route, so requests with different routes
share one graph (docs/design.md, "Compiled generation").

The op's arguments are tensors and constants, so what the eager code needs from Python objects
travels by registry:

* the wrapper module: an integer handle given at construction (and again after a copy);
* the request's KV cache: registered by the base model's pre-hook on the first forward that
  sees it (eager: generate's prefill, or a graph break at the top of a compiled one); the op
  receives a small CPU tensor holding its key, so a new request's cache needs no recompile;
* the attention call's non-tensor arguments: a short spec string built at trace time
  (constant per graph), the tensors as a list.

A per-layer order token (a one-element tensor both ops declare they mutate) keeps the MLP op
after its layer's attention op even in families whose MLP does not consume the attention output
(parallel residual).
"""

from __future__ import annotations

import functools
import itertools
import weakref
from typing import Any

import torch

# Attributes of a KV cache: a 0-d int64 CPU tensor holding the cache's registry key (what the
# compiled op receives), and the same key as a Python int (read without touching a tensor).
CACHE_KEY_ATTR = "_routertune_cache_key"
CACHE_KEY_INT_ATTR = "_routertune_cache_key_int"

_WRAPPERS: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()
_CACHES: dict[int, weakref.ref] = {}
_COUNTER = itertools.count(1)


class CompiledRoutingError(RuntimeError):
    """A compiled routed forward met something its op cannot carry (named)."""


class _Regions:
    """Whether a kept sub-layer inside an op runs as a compiled region (off: eagerly)."""

    enabled = False
    backend = "inductor"
    inside_op = 0  # > 0 while an op body runs


def compile_kept_sublayers(enabled: bool = True, backend: str = "inductor") -> None:
    """Inside the ops, run a sub-layer that keeps every row / token (the plain call) as a compiled
    region of its own instead of eagerly; mixed rows and kept-token subsets stay eager.

    One graph per routed layer (each guards on its layer index), so dynamo's recompile limit is
    raised to 64 for the process. Off by default: it adds a compilation per routed layer (seconds
    each) to the first compiled step. Measured in docs/design.md ("Speed under compilation").
    """
    _Regions.enabled, _Regions.backend = enabled, backend
    if enabled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def plain_call(wrapper: Any, *args: Any, **kwargs: Any) -> Any:
    """The wrapper's base module on the whole batch: compiled inside an op if enabled."""
    if not (_Regions.inside_op and _Regions.enabled):
        return wrapper.base_layer(*args, **kwargs)
    region = wrapper.__dict__.get("_compiled_region")
    if region is None:
        region = torch.compile(wrapper.base_layer, backend=_Regions.backend, fullgraph=True, dynamic=False)
        wrapper.__dict__["_compiled_region"] = region  # not a submodule: no state_dict entry
    return region(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------
def register_wrapper(module: torch.nn.Module) -> int:
    handle = next(_COUNTER)
    _WRAPPERS[handle] = module
    return handle


def _wrapper(handle: int) -> Any:
    module = _WRAPPERS.get(handle)
    if module is None:
        raise CompiledRoutingError(
            f"routed sub-layer {handle} no longer exists (a graph compiled for a deleted model)"
        )
    return module


@torch.compiler.disable
def _register_cache(cache: Any) -> None:
    key = next(_COUNTER)
    _CACHES[key] = weakref.ref(cache, lambda _ref, k=key: _CACHES.pop(k, None))
    setattr(cache, CACHE_KEY_ATTR, torch.tensor(key, dtype=torch.int64))
    setattr(cache, CACHE_KEY_INT_ATTR, key)


def ensure_cache_registered(cache: Any) -> None:
    """Gives ``cache`` a registry key unless it has its own (a copied cache carries its
    original's key: re-keyed on an eager forward)."""
    key = getattr(cache, CACHE_KEY_ATTR, None)
    if key is None:
        _register_cache(cache)
    elif not torch.compiler.is_compiling():
        ref = _CACHES.get(getattr(cache, CACHE_KEY_INT_ATTR, None))
        if ref is None or ref() is not cache:
            _register_cache(cache)


def _cache(cache_key: torch.Tensor | None) -> Any:
    if cache_key is None:
        return None
    ref = _CACHES.get(int(cache_key))
    cache = ref() if ref is not None else None
    if cache is None or getattr(cache, CACHE_KEY_ATTR, None) is not cache_key:
        raise CompiledRoutingError(
            "a compiled routed forward received a KV cache that routertune has not registered (for example a "
            "copy of another request's cache); run one eager forward with it first"
        )
    return cache


# --------------------------------------------------------------------------------------------
# The attention call as (spec string, tensors)
# --------------------------------------------------------------------------------------------
def _encode(value: Any, cache: Any, tensors: list[torch.Tensor], where: str) -> str:
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return "T"
    if value is None:
        return "N"
    if cache is not None and value is cache:
        return "C"
    if isinstance(value, bool):
        return "B1" if value else "B0"
    if isinstance(value, int):
        return "I" + str(value)
    if isinstance(value, (tuple, list)):
        inner = ",".join(_encode(v, cache, tensors, where) for v in value)
        return ("(" if isinstance(value, tuple) else "[") + inner + (")" if isinstance(value, tuple) else "]")
    raise CompiledRoutingError(
        f"the compiled routed attention cannot pass {where} of type {type(value).__name__} to its op; "
        "run this model uncompiled"
    )


def encode_call(args: tuple, kwargs: dict, cache: Any) -> tuple[str, list[torch.Tensor]]:
    """The attention call's arguments as a spec string (positional entries, then ``name=``
    entries, separated by ``;``) and the list of its tensors, in order."""
    tensors: list[torch.Tensor] = []
    parts = [_encode(a, cache, tensors, f"positional argument {i}") for i, a in enumerate(args)]
    parts += [k + "=" + _encode(v, cache, tensors, f"argument {k!r}") for k, v in kwargs.items()]
    return ";".join(parts), tensors


_TENSOR, _CACHE = object(), object()  # placeholders of a parsed spec


class _Container(tuple):
    """A parsed tuple / list of the spec: ``(kind, items)``."""


@functools.lru_cache(maxsize=1024)
def _parse(spec: str) -> tuple[tuple, tuple]:
    """The spec's positional and keyword templates (parsed once per spec: each graph has one per
    routed layer, and the op runs at every step)."""

    def value(text: str, pos: int) -> tuple[Any, int]:
        ch = text[pos]
        if ch == "T":
            return _TENSOR, pos + 1
        if ch == "N":
            return None, pos + 1
        if ch == "C":
            return _CACHE, pos + 1
        if ch == "B":
            return text[pos + 1] == "1", pos + 2
        if ch == "I":
            end = pos + 1
            while end < len(text) and (text[end].isdigit() or text[end] == "-"):
                end += 1
            return int(text[pos + 1 : end]), end
        if ch in "([":
            close = ")" if ch == "(" else "]"
            items, pos = [], pos + 1
            while text[pos] != close:
                item, pos = value(text, pos)
                items.append(item)
                if text[pos] == ",":
                    pos += 1
            return _Container((ch, tuple(items))), pos + 1
        raise ValueError(f"bad routed-call spec {spec!r} at {pos}")

    args, kwargs = [], []
    for part in spec.split(";") if spec else []:
        name, sep, rest = part.partition("=")
        if sep and name.isidentifier():
            kwargs.append((name, value(rest, 0)[0]))
        else:
            args.append(value(part, 0)[0])
    return tuple(args), tuple(kwargs)


def decode_call(spec: str, tensors: list[torch.Tensor], cache: Any) -> tuple[tuple, dict]:
    """Inverse of :func:`encode_call`."""
    pending = iter(tensors)

    def fill(node: Any) -> Any:
        if node is _TENSOR:
            return next(pending)
        if node is _CACHE:
            return cache
        if isinstance(node, _Container):
            kind, items = node
            filled = [fill(item) for item in items]
            return tuple(filled) if kind == "(" else filled
        return node

    args, kwargs = _parse(spec)
    return tuple(fill(a) for a in args), {name: fill(v) for name, v in kwargs}


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("routertune::routed_attention", mutates_args=("order",))
def routed_attention(
    handle: int,
    spec: str,
    tensors: list[torch.Tensor],
    hidden_index: int,
    cache_key: torch.Tensor | None,
    token_mask: torch.Tensor | None,
    routing_mask: torch.Tensor | None,
    order: torch.Tensor,
) -> torch.Tensor:
    wrapper = _wrapper(handle)
    cache = _cache(cache_key)
    args, kwargs = decode_call(spec, tensors, cache)
    _Regions.inside_op += 1
    try:
        out = wrapper.run_routed(tensors[hidden_index], token_mask, routing_mask, cache, args, kwargs)[0]
    finally:
        _Regions.inside_op -= 1
    return out if all(out.data_ptr() != t.data_ptr() for t in tensors) else out.clone()


@routed_attention.register_fake
def _(handle, spec, tensors, hidden_index, cache_key, token_mask, routing_mask, order):
    return torch.empty_like(tensors[hidden_index])


@torch.library.custom_op("routertune::routed_mlp", mutates_args=("order",))
def routed_mlp(handle: int, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    _Regions.inside_op += 1
    try:
        out = _wrapper(handle).run_routed(x)
    finally:
        _Regions.inside_op -= 1
    return out if out.data_ptr() != x.data_ptr() else out.clone()


@routed_mlp.register_fake
def _(handle, x, order):
    return torch.empty_like(x)


def call_routed_attention(wrapper, hidden, token_mask, routing_mask, cache, args, kwargs) -> tuple:
    """The traced side of a compiled routed attention: one op call, no data-dependent branch."""
    spec, tensors = encode_call(args, kwargs, cache)
    hidden_index = next(i for i, t in enumerate(tensors) if t is hidden)
    cache_key = getattr(cache, CACHE_KEY_ATTR, None) if cache is not None else None
    if cache is not None and cache_key is None:
        raise CompiledRoutingError(
            "the KV cache reached a routed layer without passing the base model's pre-hook"
        )
    out = torch.ops.routertune.routed_attention(
        wrapper.handle,
        spec,
        tensors,
        hidden_index,
        cache_key,
        token_mask,
        routing_mask,
        wrapper.routing.order,
    )
    return (out, *([None] * (wrapper.output_arity - 1)))


def call_routed_mlp(wrapper, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.routertune.routed_mlp(wrapper.handle, x, wrapper.routing.order)

"""One generation, timed; several variants, interleaved; paired ratios of their times."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from routertune.kv_cache import kv_cache_bytes
from routertune.routing.observe import track_capacity


@dataclass
class RunResult:
    """Wall-clock seconds (the result) and this process's CPU seconds (robust to a shared machine)."""

    prefill_s: float
    decode_s: float
    kv_cache_bytes: int
    prefill_cpu_s: float = 0.0
    decode_cpu_s: float = 0.0
    capacity_prefill: Any = None  # CapacityStats of the probe run
    capacity_decode: Any = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(
    model: nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    observe: bool = False,
    cache_factory: Callable[[], Any] | None = None,
) -> RunResult:
    """Prefill ``ids`` (B, T) into a fresh cache, then ``new_tokens`` greedy decode steps.

    Args:
        observe: count per-layer capacity with ``track_capacity`` (slower; for the probe run).
        cache_factory: builds the cache (default: ``DynamicCache(config=model.config)``).
    """
    from transformers import DynamicCache

    device = ids.device
    stats = [None, None]
    with torch.inference_mode():
        cache = cache_factory() if cache_factory is not None else DynamicCache(config=model.config)
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        with track_capacity(model) if observe else contextlib.nullcontext() as stats[0]:
            logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
            next_ids = logits[:, -1:].argmax(-1)  # (B, 1)
        synchronize(device)
        prefilled, prefilled_cpu = time.perf_counter(), time.process_time()
        with track_capacity(model) if observe else contextlib.nullcontext() as stats[1]:
            for _ in range(new_tokens):
                logits = model(input_ids=next_ids, cache=cache, use_cache=True, logits_to_keep=1).logits
                next_ids = logits[:, -1:].argmax(-1)
        synchronize(device)
        done, done_cpu = time.perf_counter(), time.process_time()
    return RunResult(
        prefill_s=prefilled - start,
        decode_s=done - prefilled,
        kv_cache_bytes=kv_cache_bytes(cache),
        prefill_cpu_s=prefilled_cpu - start_cpu,
        decode_cpu_s=done_cpu - prefilled_cpu,
        capacity_prefill=stats[0],
        capacity_decode=stats[1],
    )


def interleaved_runs(
    model: nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    variants: dict[str, Callable[[], contextlib.AbstractContextManager]],
    repeats: int,
    warmup: int = 1,
    cache_factory: Callable[[], Any] | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, int]]:
    """Times each variant ``repeats`` times, interleaved, the order rotating every repeat.

    Warm-up runs use the first 64 tokens and 2 decode steps (allocator and kernel warm-up; at
    the long contexts a full-size warm-up would cost as much as a repeat).

    Args:
        variants: name -> factory of a context manager that puts the model in that variant.
        cache_factory: builds each run's cache (default: a fresh ``DynamicCache``).

    Returns:
        ``({name: {"prefill_s": [...], "decode_s": [...], "prefill_cpu_s": [...], "decode_cpu_s":
        [...]}}, {name: KV-cache bytes})``.
    """
    names = list(variants)
    for _ in range(warmup):
        for v in names:
            with variants[v]():
                timed_generation(model, ids[:, : min(ids.shape[1], 64)], 2, cache_factory=cache_factory)
    keys = ("prefill_s", "decode_s", "prefill_cpu_s", "decode_cpu_s")
    times: dict[str, dict[str, list[float]]] = {v: {k: [] for k in keys} for v in names}
    kv: dict[str, int] = {}
    for r in range(repeats):
        shift = r % len(names)
        for v in names[shift:] + names[:shift]:
            with variants[v]():
                run = timed_generation(model, ids, new_tokens, cache_factory=cache_factory)
            for k in keys:
                times[v][k].append(getattr(run, k))
            kv[v] = run.kv_cache_bytes
    return times, kv


def paired_median(num: list[float], den: list[float]) -> float:
    """Median of the per-repeat ratios num[r] / den[r] (the two ran side by side in repeat r)."""
    return statistics.median(a / max(b, 1e-9) for a, b in zip(num, den, strict=True))

"""The benchmark: every (context, batch) cell in every variant, with ideal and oracle speedups."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from routertune.benchmark.environment import environment, load_average
from routertune.benchmark.flops import ModelShape, deleted_works, phase_flops, routed_works
from routertune.benchmark.settings import (
    DECODE_METHOD,
    PREFILL_METHOD,
    SCHEMA,
    VARIANTS,
    BenchError,
    BenchSettings,
)
from routertune.benchmark.tables import cell_line
from routertune.benchmark.timing import interleaved_runs, paired_median, timed_generation
from routertune.benchmark.variants import force_skip, variant
from routertune.routing.attach import get_router_config, routed_layers
from routertune.routing.router import KEEP_ALL_THRESHOLD, SKIP_ALL_THRESHOLD


def _capacities(stats: Any) -> dict[int, float]:
    return {int(i): float(c) for i, c in stats.per_layer.items()} if stats is not None else {}


def run_benchmark(
    model: nn.Module,
    settings: BenchSettings,
    name: str | None = None,
    routers: str | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Times every (context, batch) cell in every variant; returns the JSON-able report.

    ``model`` must carry routers (``attach_routers`` / ``load_routers``). With
    ``settings.skip_ratio`` its thresholds are overwritten (see :func:`force_skip`).

    Args:
        progress: optional callable taking one line of text per finished cell.
    """
    config = get_router_config(model)
    if config is None:
        raise BenchError("the model has no routers; attach or load them first")
    device = next(model.parameters()).device
    shape = ModelShape.from_config(model.config)
    skipped_forced = force_skip(model, settings.skip_ratio) if settings.skip_ratio is not None else None
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "model": name or getattr(model.config, "_name_or_path", None),
        "model_shape": shape.to_dict(),
        "granularity": config.granularity,
        "router_config": config.to_dict(),
        "routed_layers": sorted(routed_layers(model)),
        "routers": routers,
        "skip": {
            "ratio": settings.skip_ratio,
            "rule": f"deepest routed layers first; threshold {SKIP_ALL_THRESHOLD} skips a layer, {KEEP_ALL_THRESHOLD} keeps it"
            if skipped_forced is not None
            else "the routers' own decisions",
            "layers": skipped_forced,
        },
        "settings": {**asdict(settings), "prefill": PREFILL_METHOD, "decode": DECODE_METHOD},
        "environment": environment(device, model),
        "results": [],
    }
    generator = torch.Generator().manual_seed(settings.seed)
    for context in settings.contexts:
        for batch in settings.batches:
            ids = torch.randint(0, shape.vocab, (batch, context), generator=generator).to(device)
            cell = _bench_cell(model, ids, settings, shape, config.granularity)
            report["results"].append(cell)
            if progress is not None:
                progress(cell_line(cell))
    report["environment"]["load_average_end"] = load_average()
    return report


def _bench_cell(model, ids, settings: BenchSettings, shape: ModelShape, granularity: str) -> dict[str, Any]:
    batch, context = ids.shape
    n = settings.new_tokens
    load_start = load_average()
    probe = timed_generation(model, ids, n, observe=True)
    cap_prefill = _capacities(probe.capacity_prefill)
    # Sequence routes are decided at prefill and reused by every decode step.
    decode_stats = probe.capacity_decode if granularity.endswith("token") else probe.capacity_prefill
    cap_decode = _capacities(decode_stats)
    deleted, oracle_reason = _oracle_layers(cap_prefill, cap_decode)
    names = [v for v in settings.variants if v != "oracle" or oracle_reason is None]

    contexts = {v: (lambda v=v: variant(model, v, deleted)) for v in names}
    times, kv = interleaved_runs(model, ids, n, contexts, settings.repeats, settings.warmup)

    target = granularity.split("_", 1)[0]
    works = {"dense": None, "deleted": deleted_works(target, deleted or [])}
    # Thresholds of 0 or above 1 fix the decision without running the router.
    scored = {i for i, layer in routed_layers(model).items() if layer.router.fixed_decision is None}
    flops = {}
    for phase, caps in (("prefill", cap_prefill), ("decode", cap_decode)):
        kw = dict(context=context, batch=batch, new_tokens=n)
        flops[phase] = {
            "dense": phase_flops(shape, phase, works=None, **kw).to_dict(),
            "routed": phase_flops(shape, phase, works=routed_works(granularity, caps, scored), **kw).to_dict(),
            "deleted": phase_flops(shape, phase, works=works["deleted"], **kw).to_dict()
            if oracle_reason is None
            else None,
        }

    variants_out = {}
    for v in VARIANTS:
        if v not in times:
            variants_out[v] = None
            continue
        t = times[v]
        pre, dec = statistics.median(t["prefill_s"]), statistics.median(t["decode_s"])
        variants_out[v] = {
            **t,
            "prefill_s_median": pre,
            "decode_s_median": dec,
            "prefill_tokens_per_s": batch * context / pre,
            "decode_tokens_per_s": batch * n / dec,
            "kv_cache_bytes": kv[v],
        }
    return {
        "context": context,
        "batch": batch,
        "new_tokens": n,
        "repeats": settings.repeats,
        "warmup": settings.warmup,
        "capacity": {"prefill": cap_prefill, "decode": cap_decode},
        "capacity_overall": {
            "prefill": probe.capacity_prefill.as_dict()["overall"],
            "decode": decode_stats.as_dict()["overall"],
        },
        "oracle_layers": deleted,
        "oracle_note": oracle_reason,
        "variants": variants_out,
        "flops": flops,
        "speedup": {phase: _speedups(times, flops[phase], phase) for phase in ("prefill", "decode")},
        "kv_cache_bytes": {v: kv.get(v) for v in VARIANTS},
        "load_average": {"start": load_start, "end": load_average()},
    }


def _oracle_layers(cap_prefill: dict[int, float], cap_decode: dict[int, float]) -> tuple[list[int] | None, str | None]:
    """Layers to delete for the oracle, or None and the reason there is no such model."""
    mixed = sorted(i for caps in (cap_prefill, cap_decode) for i, c in caps.items() if 0.0 < c < 1.0)
    if mixed:
        return None, (
            f"routed layers {sorted(set(mixed))} keep some but not all of their units; no model with "
            "deleted sub-layers computes the same thing"
        )
    skipped = sorted(i for i, c in cap_prefill.items() if c == 0.0)
    if skipped != sorted(i for i, c in cap_decode.items() if c == 0.0):
        return None, "prefill and decode skip different layers"
    if not skipped:
        return None, "nothing is skipped: the oracle is the dense model"
    return skipped, None


def _speedups(times: dict[str, dict[str, list[float]]], flops: dict[str, Any], phase: str) -> dict[str, Any]:
    key, cpu_key = f"{phase}_s", f"{phase}_cpu_s"
    dense = times["dense"][key]
    measured = paired_median(dense, times["routed"][key])
    ideal = flops["dense"]["total"] / flops["routed"]["total"]
    measured_cpu = paired_median(times["dense"][cpu_key], times["routed"][cpu_key])
    out: dict[str, Any] = {
        "measured": measured,
        "ideal": ideal,
        "measured_over_ideal": measured / ideal,
        "measured_cpu": measured_cpu,
        "measured_cpu_over_ideal": measured_cpu / ideal,
        "all_kept_overhead": paired_median(times["all_kept"][key], dense) - 1.0 if "all_kept" in times else None,
        "all_kept_overhead_cpu": paired_median(times["all_kept"][cpu_key], times["dense"][cpu_key]) - 1.0
        if "all_kept" in times
        else None,
        "oracle_measured": None,
        "oracle_ideal": None,
        "routed_over_oracle": None,
    }
    if "oracle" in times and flops["deleted"] is not None:
        out["oracle_measured"] = paired_median(dense, times["oracle"][key])
        out["oracle_ideal"] = flops["dense"]["total"] / flops["deleted"]["total"]
        out["routed_over_oracle"] = paired_median(times["oracle"][key], times["routed"][key])
    return out


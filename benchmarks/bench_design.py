"""Measurements behind the design choices of routed layers (docs/design.md).

    OMP_NUM_THREADS=2 /work/venv/bin/python benchmarks/bench_design.py            # all three
    OMP_NUM_THREADS=2 /work/venv/bin/python benchmarks/bench_design.py --only kv_rows --context 512

(a) ``kv_rows``: ``attn_sequence`` with a mixed batch (batch 8, half the rows skip every routed
    layer). The current design runs attention on the kept rows only, and a mixed layer of a
    dynamic cache holds the kept rows' keys/values alone (``CompactRows``: no per-step gather).
    Compared with: the previous design, ZERO key/value rows for the skipped ones so every layer's
    cache is batch-wide, the kept rows gathered back at every step (what a static cache still
    does); computing the skipped rows' keys/values anyway (real K/V for every row,
    queries/attention/o for the kept rows); and the seed's way (attention for every row, update
    masked to 0).
(b) ``token_attn``: ``attn_token`` with about half the tokens kept in every routed layer. The
    current design computes K/V for every token and queries/attention/o_proj for kept tokens only
    (gathered, padded to the row with most kept tokens), except at a decode step of a batch: on
    CPU (the decision is in host memory) the kept rows run alone, the kernel reading the cache in
    place one run of consecutive kept rows at a time; on an accelerator every row is computed and
    the skipped rows' update zeroed (no host read: ``masked_at_decode`` here). Compared with the
    design before that (kept queries padded at decode steps too), with selecting the kept rows
    and copying their keys/values for one kernel call, and with computing everything and masking
    the update (the seed's way).
(c) ``overhead``: the cost of having routers at all: dense vs threshold 0 (decided without
    scoring) vs zero routers at threshold 0.5 (scored every prefill, everything kept);
    ``overhead_micro`` isolates the per-layer Python cost on a model where compute is negligible.

The alternatives are installed by swapping methods of ``routertune.routing.layers`` for the duration of
one variant; the library itself is untouched. Results: benchmarks/results/bench_design.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import routertune.routing.layers as L
import routertune.routing.masks as masks
import routertune.routing.routes as R
import routertune.routing.token_attention as TA
from routertune import RouterConfig, attach_routers
from routertune.benchmark import interleaved_runs, load_bench_model, routers_detached, timed_generation
from routertune.benchmark.environment import environment
from routertune.benchmark.flops import LayerWork, ModelShape, phase_flops, routed_works
from routertune.io_utils import atomic_write_text
from routertune.routing.attach import all_units_kept, routed_layers, set_thresholds
from routertune.routing.observe import router_probabilities

RESULTS = Path(__file__).parent / "results"


# ---- (a) alternatives for mixed-row attention ---------------------------------------------------
def rows_attention_update(wrapper, x, rows, kwargs, cache) -> torch.Tensor:
    """Attention output ``(B, T, C)`` for the batch rows ``rows`` only (zeros elsewhere).

    Keys/values are computed for EVERY row and written to the cache; queries, the attention
    kernel and o_proj only for ``rows``. ``wrapper`` is a ``RoutedAttention``; ``x`` its input.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    attn, spec = wrapper.base_layer, wrapper.routing.arch
    B, T, C = x.shape
    k, v = TA.keys_and_values(attn, spec, x, kwargs["position_embeddings"], cache)  # (B, Hkv, S, D)
    K = rows.shape[0]
    q = TA._heads(attn, spec, attn.q_proj, "q_norm", x.index_select(0, rows))  # (K, H, T, D)
    cos_r, sin_r = L._select_rows(kwargs["position_embeddings"], rows, B)
    q = TA._rotary(attn, q, cos_r, sin_r)
    mask = L._select_rows(kwargs.get("attention_mask"), rows, B)
    out, _ = sdpa_attention_forward(
        attn, q, k.index_select(0, rows), v.index_select(0, rows), mask, dropout=0.0, scaling=attn.scaling
    )
    out = attn.o_proj(out.reshape(K, T, -1))  # (K, T, C)
    return x.new_zeros(B, T, C).index_copy(0, rows, out.to(x.dtype))


_CURRENT_ROWS = L.RoutedAttention._run_rows


def _attention_rows_with_all_kv(self, route, hidden, args, kwargs):
    """(a) alternative: real keys/values for every row, queries/attention/o_proj for kept rows."""
    if route.all_kept or route.none_kept:
        return _CURRENT_ROWS(self, route, hidden, args, kwargs)
    cache = next((kwargs[k] for k in L.CACHE_KWARGS if kwargs.get(k) is not None), None)
    return rows_attention_update(self, hidden, route.kept_rows, kwargs, cache), None


_CURRENT_TOKEN_ATTENTION = L.RoutedAttention._run_tokens
_CURRENT_DECISION = L.Decision.__init__


def _decision_counted_on_host(self, route=None, keep=None, gate=None, fixed=None):
    """(b) previous design: every scored token decision's counts read on the host, so a decode
    step of a batch pads its kept tokens to one query slot per row (queries, attention and o_proj
    for every row whenever one row keeps) and gathers the MLP's kept tokens."""
    _CURRENT_DECISION(self, route, keep, gate, fixed)
    if keep is not None and fixed is None:
        self.masked, self.kept_rows = False, None
        self.count_on_host(keep)


def _token_attention_rows_at_decode(self, d, hidden, cache, args, kwargs):
    """(b) alternative: at a decode step (one token per row) of a batch, select the kept ROWS
    (one host read of which): queries, attention and o_proj for kept tokens only, the kept rows'
    keys/values copied out of the cache for the kernel."""
    B, T, _ = hidden.shape
    if T == 1 and B > 1 and not d.all_kept and masks.rows_selectable(kwargs.get("attention_mask")):
        rows = d.keep[:, 0].nonzero().squeeze(1)
        if rows.numel() == 0:
            TA.keys_and_values(
                self.base_layer, self.routing.arch, hidden, kwargs["position_embeddings"], cache
            )
            return torch.zeros_like(hidden), None
        return rows_attention_update(self, hidden, rows, kwargs, cache), None
    return _CURRENT_TOKEN_ATTENTION(self, d, hidden, cache, args, kwargs)


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def forced_rows_cache(model, keep_by_layer: dict[int, torch.Tensor]) -> Callable[[], Any]:
    """A cache factory whose caches carry fixed per-layer row routes (as if decided at prefill)."""
    from transformers import DynamicCache

    def make():
        cache = DynamicCache(config=model.config)
        store = L.routes_of(cache)
        for i, keep in keep_by_layer.items():
            store[i] = L.SequenceRoute.from_keep(keep)
        return cache

    return make


def check_same_outputs(model, ids, variants: dict[str, Callable], cache_factory=None, steps: int = 3) -> None:
    """The compared implementations must compute the same thing: prefill + greedy steps agree."""
    from transformers import DynamicCache

    results = {}
    for name, make in variants.items():
        with make(), torch.inference_mode():
            cache = cache_factory() if cache_factory else DynamicCache(config=model.config)
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
            trace = [logits]
            for _ in range(steps):
                nxt = trace[-1].argmax(-1, keepdim=True)
                trace.append(model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1])
        results[name] = torch.stack(trace)
    names = list(results)
    for name in names[1:]:
        torch.testing.assert_close(results[name], results[names[0]], rtol=1e-3, atol=1e-3,
                                   msg=lambda m, n=name: f"{n} differs from {names[0]}: {m}")


# ---- measuring ---------------------------------------------------------------------------------
def summarize(times, kv, flops: dict[str, dict[str, float]], baseline: str = "dense") -> dict[str, Any]:
    """Per variant: median seconds, speedup vs baseline (median of paired ratios), FLOP-ideal."""
    out = {}
    for name, t in times.items():
        entry: dict[str, Any] = {"kv_cache_bytes": kv[name], **t}
        for phase in ("prefill", "decode"):
            key = f"{phase}_s"
            entry[f"{key}_median"] = statistics.median(t[key])
            ratios = [a / b for a, b in zip(times[baseline][key], t[key], strict=True)]
            entry[f"{phase}_speedup"] = statistics.median(ratios)
            cpu_key = f"{phase}_cpu_s"
            cpu = [a / max(b, 1e-9) for a, b in zip(times[baseline][cpu_key], t[cpu_key], strict=True)]
            entry[f"{phase}_speedup_cpu"] = statistics.median(cpu)
            if name in flops:
                ideal = flops[baseline][phase] / flops[name][phase]
                entry[f"{phase}_ideal"] = ideal
                entry[f"{phase}_measured_over_ideal"] = entry[f"{phase}_speedup"] / ideal
        out[name] = entry
    return out


def phase_totals(shape, context, batch, new_tokens, works) -> dict[str, float]:
    return {
        phase: phase_flops(shape, phase, context, batch, works, new_tokens).total for phase in ("prefill", "decode")
    }


def fresh_routers(model, granularity: str, router_layers: int) -> None:
    from routertune import detach_routers

    detach_routers(model)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=router_layers))


def measure_kv_rows(model, args, shape) -> list[dict[str, Any]]:
    fresh_routers(model, "attn_sequence", args.router_layers)
    layers = sorted(routed_layers(model))
    set_thresholds(model, 0.0)  # every decision comes from the forced routes below
    batch = 8
    g = torch.Generator().manual_seed(1)
    keep = {}
    for i in layers:  # exactly half the rows skip, a different half in every layer
        k = torch.zeros(batch, dtype=torch.bool)
        k[torch.randperm(batch, generator=g)[: batch // 2]] = True
        keep[i] = k
    variants = {
        "dense": lambda: routers_detached(model),
        "compact_rows": contextlib.nullcontext,  # the library as it is
        "zero_kv_rows": lambda: patched(R, "COMPACT_LAYER_CLASSES", {}),
        "all_rows_kv": lambda: patched(L.RoutedAttention, "_run_rows", _attention_rows_with_all_kv),
        "compute_all_mask": lambda: patched(L, "_rows_of_call", lambda *a: None),
    }
    routed_variants = {k: v for k, v in variants.items() if k != "dense"}
    check_same_outputs(model, torch.randint(0, shape.vocab, (batch, 24), generator=g), routed_variants,
                       forced_rows_cache(model, keep))
    out = []
    for context in args.contexts:
        ids = torch.randint(0, shape.vocab, (batch, context), generator=g)
        times, kv = interleaved_runs(
            model, ids, args.new_tokens, variants, args.repeats, args.warmup, forced_rows_cache(model, keep)
        )
        half = dict.fromkeys(layers, 0.5)
        flops = {
            "dense": phase_totals(shape, context, batch, args.new_tokens, None),
            "compact_rows": phase_totals(shape, context, batch, args.new_tokens, routed_works("attn_sequence", half, set())),
            "all_rows_kv": phase_totals(
                shape, context, batch, args.new_tokens, dict.fromkeys(layers, LayerWork(q_o=0.5, kv=1.0, core=0.5))
            ),
            "compute_all_mask": phase_totals(shape, context, batch, args.new_tokens, None),
        }
        flops["zero_kv_rows"] = flops["compact_rows"]
        out.append({"context": context, "batch": batch, "kept_rows_per_layer": batch // 2,
                    "variants": summarize(times, kv, flops)})
        print(f"kv_rows context {context}: " + _line(out[-1]), file=sys.stderr, flush=True)
    return out


def measure_token_attention(model, args, shape) -> list[dict[str, Any]]:
    fresh_routers(model, "attn_token", args.router_layers)
    layers = routed_layers(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers.values():
            w = layer.router.proj.weight
            w.copy_(torch.randn(w.shape, generator=g) / shape.hidden**0.5)
    # Per-layer thresholds at the median score of a calibration prompt: about half the tokens kept.
    calib = torch.randint(0, shape.vocab, (2, 256), generator=g)
    with torch.inference_mode(), router_probabilities(model) as rec:
        model(calib)
    set_thresholds(model, {i: float(s.median()) for i, s in rec.per_layer().items()})
    variants = {
        "dense": lambda: routers_detached(model),
        "kept_queries": contextlib.nullcontext,  # the library as it is (on CPU: kept row runs at decode)
        "masked_at_decode": lambda: patched(L, "decision_on_host", lambda keep: False),  # an accelerator's path
        "padded_queries_at_decode": lambda: patched(L.Decision, "__init__", _decision_counted_on_host),
        "compute_all_mask": lambda: patched(L, "supports_kept_queries", lambda attn, spec: False),
        "kept_rows_at_decode": lambda: patched(L.RoutedAttention, "_run_tokens", _token_attention_rows_at_decode),
    }
    check_same_outputs(model, torch.randint(0, shape.vocab, (3, 24), generator=g),
                       {k: v for k, v in variants.items() if k != "dense"})
    out = []
    for context in args.contexts:
        for batch in (1, 8):
            ids = torch.randint(0, shape.vocab, (batch, context), generator=g)

            probe = timed_generation(model, ids, args.new_tokens, observe=True)
            caps = {ph: {int(i): c for i, c in st.per_layer.items()}
                    for ph, st in (("prefill", probe.capacity_prefill), ("decode", probe.capacity_decode))}
            times, kv = interleaved_runs(model, ids, args.new_tokens, variants, args.repeats, args.warmup)
            flops = {"dense": phase_totals(shape, context, batch, args.new_tokens, None)}
            flops["kept_queries"] = {
                ph: phase_flops(shape, ph, context, batch, routed_works("attn_token", caps[ph]), args.new_tokens).total
                for ph in ("prefill", "decode")
            }
            ones = dict.fromkeys(layers, 1.0)  # computing everything = keeping everything, plus the router
            flops["kept_rows_at_decode"] = flops["padded_queries_at_decode"] = flops["kept_queries"]
            flops["masked_at_decode"] = {  # prefill as the library, decode computes every row
                "prefill": flops["kept_queries"]["prefill"],
                "decode": phase_flops(shape, "decode", context, batch, routed_works("attn_token", ones), args.new_tokens).total,
            }
            flops["compute_all_mask"] = {
                ph: phase_flops(shape, ph, context, batch, routed_works("attn_token", ones), args.new_tokens).total
                for ph in ("prefill", "decode")
            }
            overall = {ph: statistics.fmean(c.values()) for ph, c in caps.items()}
            out.append({"context": context, "batch": batch, "capacity": overall, "variants": summarize(times, kv, flops)})
            print(f"token_attn context {context} batch {batch}: " + _line(out[-1]), file=sys.stderr, flush=True)
    return out


def measure_overhead(model, args, shape) -> list[dict[str, Any]]:
    out = []
    g = torch.Generator().manual_seed(3)
    for granularity in ("attn_sequence", "attn_token"):
        fresh_routers(model, granularity, args.router_layers)  # zero routers, threshold 0.5: all kept
        variants = {
            "dense": lambda: routers_detached(model),
            "threshold_0": lambda: all_units_kept(model),
            "scored_all_kept": contextlib.nullcontext,
        }
        for context in args.contexts:
            for batch in (1, 8):
                ids = torch.randint(0, shape.vocab, (batch, context), generator=g)
                times, kv = interleaved_runs(model, ids, args.new_tokens, variants, args.repeats, args.warmup)
                out.append({"granularity": granularity, "context": context, "batch": batch,
                            "variants": summarize(times, kv, {})})
                print(f"overhead {granularity} context {context} batch {batch}: " + _line(out[-1]),
                      file=sys.stderr, flush=True)
    return out


def measure_overhead_micro(model, args, shape) -> list[dict[str, Any]]:
    """Python-side cost of routed layers, isolated: a 30-layer model of width 64, where a decode
    step is nothing but per-op overhead. CPU seconds per step, dense vs threshold 0 vs scored
    zero routers; the difference divided by the layer count is the cost per layer and step."""
    import time

    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    tiny = LlamaForCausalLM(config).eval()
    attach_routers(tiny, RouterConfig(router_layers=16))
    steps = args.micro_steps

    def per_step(make) -> float:
        with make(), torch.inference_mode():
            cache = DynamicCache(config=config)
            tiny(input_ids=torch.randint(0, 128, (1, 16)), cache=cache, use_cache=True, logits_to_keep=1)
            token = torch.zeros(1, 1, dtype=torch.long)
            start = time.process_time()
            for _ in range(steps):
                tiny(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            return (time.process_time() - start) / steps

    variants = {
        "dense": lambda: routers_detached(tiny),
        "threshold_0": lambda: all_units_kept(tiny),
        "scored_all_kept": contextlib.nullcontext,
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(max(args.repeats, 5)):
        for name, make in variants.items():
            samples[name].append(per_step(make))
    dense = statistics.median(samples["dense"])
    out = {"layers": 30, "routed_layers": 16, "steps": steps, "dense_us_per_step": dense * 1e6}
    for name in ("threshold_0", "scored_all_kept"):
        extra = statistics.median(samples[name]) - dense
        out[f"{name}_extra_us_per_layer"] = extra / 30 * 1e6
    print(f"overhead_micro: {out}", file=sys.stderr, flush=True)
    return [out]


def _line(entry: dict[str, Any]) -> str:
    parts = []
    for name, v in entry["variants"].items():
        parts.append(f"{name} {v['prefill_speedup']:.3f}/{v['decode_speedup']:.3f}")
    return "speedup prefill/decode: " + ", ".join(parts)


# ---- report ------------------------------------------------------------------------------------
TITLES = {
    "kv_rows": "(a) attn_sequence, batch 8, half the rows skip every routed layer",
    "token_attn": "(b) attn_token, about half the tokens kept in every routed layer",
    "overhead": "(c) routing overhead, everything kept",
    "overhead_micro": "(c') routing overhead per layer, isolated (30 layers of width 64: a decode step is all overhead)",
}


def markdown(runs: dict[str, Any]) -> str:
    """One section per measurement, each with the conditions it was measured under."""
    lines = ["# Design measurements (generated by benchmarks/bench_design.py)", ""]
    for key, title in TITLES.items():
        if key not in runs:
            continue
        run = runs[key]
        env, st = run["environment"], run["settings"]
        lines += [
            f"## {title}",
            "",
            f"Model {run['model']}, {env['device']} {env['dtype']}, {env['threads']} threads, {env['cpu']}; "
            f"load average at start {env['load_average_start']}, at end {run['load_average_end']}; {env['time']}; "
            f"{st['new_tokens']} decode tokens, {st['repeats']} repeats. Speedups are medians of paired ratios "
            "to dense, wall-clock (CPU time in brackets).",
            "",
        ]
        if key == "overhead_micro":
            for entry in run["entries"]:
                lines += [
                    f"dense {entry['dense_us_per_step']:.0f} us CPU per decode step; extra per layer and step: "
                    f"threshold 0 {entry['threshold_0_extra_us_per_layer']:+.2f} us, zero routers scored at "
                    f"threshold 0.5 {entry['scored_all_kept_extra_us_per_layer']:+.2f} us.",
                    "",
                ]
            continue
        lines += ["| cell | variant | prefill s | prefill speedup | ideal | decode s | decode speedup | ideal | KV MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for entry in run["entries"]:
            cell = ", ".join(f"{k} {entry[k]}" for k in ("granularity", "context", "batch") if k in entry)
            for name, v in entry["variants"].items():
                lines.append(
                    f"| {cell} | {name} | {v['prefill_s_median']:.3f} "
                    f"| {v['prefill_speedup']:.3f} ({v['prefill_speedup_cpu']:.3f}) "
                    f"| {_opt(v.get('prefill_ideal'))} | {v['decode_s_median']:.3f} "
                    f"| {v['decode_speedup']:.3f} ({v['decode_speedup_cpu']:.3f}) "
                    f"| {_opt(v.get('decode_ideal'))} | {v['kv_cache_bytes'] / 2**20:.1f} |"
                )
        lines.append("")
    return "\n".join(lines)


def load_runs(path: Path) -> dict[str, Any]:
    """Earlier measurements in ``path`` (also the first layout: one environment for all)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if "runs" in data:
        return data["runs"]
    common = {k: data[k] for k in ("model", "environment", "settings", "load_average_end")}
    return {key: {**common, "entries": entries} for key, entries in data["measurements"].items()}


def _opt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--only", choices=("kv_rows", "token_attn", "overhead", "overhead_micro"), action="append")
    parser.add_argument("--context", dest="contexts", type=int, action="append")
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--router_layers", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--micro_steps", type=int, default=300, help="decode steps per sample in overhead_micro")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_design")
    args = parser.parse_args(argv)
    args.contexts = args.contexts or [512]
    torch.set_num_threads(args.threads)
    model, name = load_bench_model(args.model)
    attach_routers(model, RouterConfig(router_layers=args.router_layers))
    shape = ModelShape.from_config(model.config)
    steps = {
        "kv_rows": measure_kv_rows,
        "token_attn": measure_token_attention,
        "overhead": measure_overhead,
        "overhead_micro": measure_overhead_micro,
    }
    json_path = args.out.with_suffix(".json")
    runs = load_runs(json_path)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for key in args.only or list(steps):
        env = environment(next(model.parameters()).device, model)
        entries = steps[key](model, args, shape)
        runs[key] = {
            "model": name,
            "environment": env,
            "settings": settings,
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "entries": entries,
        }
        # Written after every measurement: a long run that is stopped keeps what it finished.
        atomic_write_text(json_path, json.dumps({"schema": "routertune.bench_design/1", "runs": runs}, indent=2) + "\n")
        atomic_write_text(args.out.with_suffix(".md"), markdown(runs))
    print(markdown(runs))


if __name__ == "__main__":
    main()

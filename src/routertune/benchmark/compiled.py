"""The compiled benchmark: decode under ``torch.compile`` against the fastest dense model.

    from routertune.benchmark.compiled import run_compiled_benchmark
    report = run_compiled_benchmark(model, BenchSettings(contexts=(512,), batches=(1, 8), skip_ratio=0.5))

Users who care about decode speed run transformers' fast path: a static cache and a compiled
forward for the decode steps (what ``generate`` does by itself on CUDA with a static cache:
prefill eager, decode compiled). So the routed model is compared with the dense model compiled
the same way, not only with eager dense. Five variants, each its own model object (a compiled
function holds guards on the modules it traced, so one object switched between variants would
recompile at every switch), interleaved within every repeat:

* ``dense_eager``, ``dense_compiled``: the plain model;
* ``routed_eager``, ``routed_compiled``: the routed model (its own decisions, or those forced by
  ``skip_ratio``); compiled, each routed sub-layer is one opaque op (routing/compiled.py);
* ``routed_scored_compiled`` (with ``skip_ratio`` only): the same forced route reached by
  scoring (zero router weights score 0.5; thresholds 0.4 keep, 0.6 skip), as learned routers
  decide: forced thresholds are part of the model and compile as plain or deleted sub-layers,
  scored decisions run as ops, and this variant times that path;
* ``routed_scored_regions``: the same compiled forward, with the kept sub-layers inside the
  ops compiled as regions of their own (:func:`routertune.routing.compiled.compile_kept_sublayers`);
* ``oracle_compiled``: the plain model with the skipped sub-layers deleted, compiled (defined
  when every routed layer keeps all or none of its units).

Each model prefills once per cell into a ``StaticCache`` of ``context + new_tokens`` slots
(eager, timed once; its eager and compiled variants share it); every timed decode run then
restarts from the end of the prompt (the cache layers' lengths are reset, so each run writes
the same slots). The first compiled call of each
variant and shape is the compilation, timed and reported separately; graphs are static per
shape (``dynamic=False``) unless asked otherwise. Greedy tokens of each variant are compared with its eager
reference (dense with dense eager; routed and oracle with routed eager) before timing.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from routertune.benchmark.environment import environment, load_average
from routertune.benchmark.settings import SCHEMA, BenchError, BenchSettings
from routertune.benchmark.suite import _capacities, _oracle_layers
from routertune.benchmark.timing import paired_median, synchronize, timed_generation
from routertune.benchmark.variants import deleted_copy, force_skip
from routertune.kv_cache import kv_cache_bytes
from routertune.routing.attach import detach_routers, get_router_config, routed_layers, set_thresholds
from routertune.routing.compiled import compile_kept_sublayers

COMPILED_VARIANTS = (
    "dense_eager",
    "dense_compiled",
    "routed_eager",
    "routed_compiled",
    "routed_scored_compiled",
    "routed_scored_regions",
    "oracle_compiled",
)
COMPILED_METHOD = (
    "prefill eager into a StaticCache(context + new_tokens), then `new_tokens` greedy single-token forwards; "
    "compiled variants decode with torch.compile(model.forward, fullgraph=True) (inductor, default mode)"
)


def _scored_copy(model: nn.Module, skipped: list[int]) -> nn.Module:
    """A copy whose routers reach the forced route by scoring: zero weights score 0.5."""
    scored = copy.deepcopy(model)
    layers = routed_layers(scored)
    with torch.no_grad():
        for layer in layers.values():
            layer.router.proj.weight.zero_()
    set_thresholds(scored, {i: (0.6 if i in skipped else 0.4) for i in layers})
    return scored


def _restart_decode(cache: Any, context: int) -> None:
    """Every stored layer back to ``context`` tokens (the next update overwrites the same slots)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.cumulative_length.fill_(context)


class _Runner:
    """One variant: its model, its (compiled) decode forward, its prefilled cache."""

    def __init__(
        self,
        model: nn.Module,
        compiled: bool,
        backend: str = "inductor",
        dynamic: bool | None = False,
        regions: bool = False,
    ) -> None:
        self.model = model
        self.regions = regions
        self.backend = backend
        self.forward = (
            torch.compile(model.forward, fullgraph=True, backend=backend, dynamic=dynamic)
            if compiled
            else model.forward
        )
        self.compiled = compiled
        self.cache = None
        self.first_token = None
        self.prefill_s = 0.0
        self.compile_s: list[float] = []

    def prefill(self, ids: torch.Tensor, new_tokens: int) -> None:
        from transformers import StaticCache

        self.cache = StaticCache(config=self.model.config, max_cache_len=ids.shape[1] + new_tokens)
        synchronize(ids.device)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1).logits
        synchronize(ids.device)
        self.prefill_s = time.perf_counter() - start
        self.first_token = logits[:, -1:].argmax(-1)
        self.context = ids.shape[1]

    def share_prefill(self, other: _Runner) -> None:
        """Decode from ``other``'s prefilled cache (same model; every decode run restarts at the prompt's end)."""
        self.cache, self.first_token, self.context, self.prefill_s = (
            other.cache,
            other.first_token,
            other.context,
            other.prefill_s,
        )

    def decode(self, steps: int) -> tuple[float, float, torch.Tensor]:
        """(wall s, CPU s, the greedy tokens) of ``steps`` decode steps from the end of the prompt."""
        _restart_decode(self.cache, self.context)
        compile_kept_sublayers(self.regions, self.backend)
        token, tokens = self.first_token, []
        synchronize(token.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for _ in range(steps):
                logits = self.forward(
                    input_ids=token, cache=self.cache, use_cache=True, logits_to_keep=1
                ).logits
                token = logits[:, -1:].argmax(-1)
                tokens.append(token)
        synchronize(token.device)
        compile_kept_sublayers(False)
        return time.perf_counter() - start, time.process_time() - start_cpu, torch.cat(tokens, 1)


def run_compiled_benchmark(
    model: nn.Module,
    settings: BenchSettings,
    name: str | None = None,
    progress: Any = None,
    backend: str = "inductor",
    dynamic: bool | None = False,
) -> dict[str, Any]:
    """Times decode of every variant of :data:`COMPILED_VARIANTS` per (context, batch) cell.

    ``model`` must carry routers; with ``settings.skip_ratio`` its thresholds are overwritten.
    ``backend`` is torch.compile's (``"eager"`` traces without compiling: graph checks, quickly).
    ``dynamic`` is too: False (default) compiles one static graph per shape, as a static cache
    allows (on this project's CPU both kinds decoded SmolLM2 at batch 8 slower than eager:
    0.70x static, 0.72x dynamic; the eager dense model is then the fastest dense one).
    """
    config = get_router_config(model)
    if config is None:
        raise BenchError("the model has no routers; attach or load them first")
    device = next(model.parameters()).device
    forced = force_skip(model, settings.skip_ratio) if settings.skip_ratio is not None else None
    plain = detach_routers(copy.deepcopy(model))
    # Every variant is a model object of its own, so the compiled graphs of several of them
    # live side by side under one code object (transformers' forward).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    runners = {"dense_eager": _Runner(plain, False), "dense_compiled": _Runner(plain, True, backend, dynamic)}
    runners["routed_eager"] = _Runner(model, False)
    runners["routed_compiled"] = _Runner(model, True, backend, dynamic)
    if forced is not None:
        scored = _Runner(_scored_copy(model, forced), True, backend, dynamic)
        runners["routed_scored_compiled"] = scored
        # the same model and compiled forward (one graph); the regions are switched at run time
        runners["routed_scored_regions"] = copy.copy(scored)
        runners["routed_scored_regions"].regions = True
    oracles: dict[tuple[int, ...], _Runner] = {}  # by the layers deleted
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": "compiled",
        "model": name or getattr(model.config, "_name_or_path", None),
        "granularity": config.granularity,
        "routed_layers": sorted(routed_layers(model)),
        "skip": {"ratio": settings.skip_ratio, "layers": forced},
        "settings": {**asdict(settings), "method": COMPILED_METHOD, "backend": backend, "dynamic": dynamic},
        "environment": environment(device, model),
        "results": [],
    }
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = model.config.vocab_size
    for context in settings.contexts:
        for batch in settings.batches:
            ids = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
            probe = timed_generation(model, ids, 2, observe=True)  # the routes of this prompt
            # sequence routes are decided at prefill and reused by every decode step
            decode_stats = probe.capacity_decode if config.unit == "token" else probe.capacity_prefill
            deleted, reason = _oracle_layers(_capacities(probe.capacity_prefill), _capacities(decode_stats))
            cell_runners = dict(runners)
            if reason is None:
                if tuple(deleted) not in oracles:
                    oracles[tuple(deleted)] = _Runner(
                        deleted_copy(plain, deleted, config.target), True, backend
                    )
                cell_runners["oracle_compiled"] = oracles[tuple(deleted)]
            cell = _compiled_cell(cell_runners, ids, settings, deleted, reason)
            report["results"].append(cell)
            if progress is not None:
                progress(compiled_cell_line(cell))
    report["environment"]["load_average_end"] = load_average()
    return report


def _compiled_cell(
    runners: dict[str, _Runner], ids, settings: BenchSettings, deleted, reason
) -> dict[str, Any]:
    batch, context = ids.shape
    n = settings.new_tokens
    load_start = load_average()
    names = [v for v in COMPILED_VARIANTS if v in runners]
    prefill, greedy, compile_s = {}, {}, {}
    prefilled: dict[int, _Runner] = {}  # eager and compiled runs of one model share its prefill
    for v in names:
        r = runners[v]
        if id(r.model) in prefilled:
            r.share_prefill(prefilled[id(r.model)])
        else:
            r.prefill(ids, n)
            prefilled[id(r.model)] = r
        prefill[v] = r.prefill_s
        started = time.perf_counter()
        _, _, tokens = r.decode(n)  # the first compiled call of a new shape compiles
        compile_s[v] = time.perf_counter() - started if r.compiled else None
        for _ in range(settings.warmup):
            r.decode(min(n, 4))
        greedy[v] = tokens
    # each variant against its eager reference: dense with dense, routed and oracle with routed
    reference = {v: greedy["dense_eager" if v.startswith("dense") else "routed_eager"] for v in names}
    tokens_equal = {v: bool(torch.equal(greedy[v], reference[v])) for v in names}

    times: dict[str, dict[str, list[float]]] = {v: {"decode_s": [], "decode_cpu_s": []} for v in names}
    for rep in range(settings.repeats):
        shift = rep % len(names)
        for v in names[shift:] + names[:shift]:
            wall, cpu, _ = runners[v].decode(n)
            times[v]["decode_s"].append(wall)
            times[v]["decode_cpu_s"].append(cpu)

    def speedup(num: str, den: str, key: str = "decode_s") -> float | None:
        if num not in times or den not in times:
            return None
        return paired_median(times[num][key], times[den][key])

    variants = {
        v: {
            **times[v],
            "decode_s_median": statistics.median(times[v]["decode_s"]),
            "decode_tokens_per_s": batch * n / statistics.median(times[v]["decode_s"]),
            "prefill_s": prefill[v],
            "first_call_s": compile_s[v],
            "kv_cache_bytes": kv_cache_bytes(runners[v].cache),
            "tokens_equal_eager": tokens_equal[v],
        }
        for v in names
    }
    routed_gain = speedup("dense_compiled", "routed_compiled")
    scored_gain = speedup("dense_compiled", "routed_scored_compiled")
    regions_gain = speedup("dense_compiled", "routed_scored_regions")
    oracle_gain = speedup("dense_compiled", "oracle_compiled")
    return {
        "context": context,
        "batch": batch,
        "new_tokens": n,
        "repeats": settings.repeats,
        "oracle_layers": deleted,
        "oracle_note": reason,
        "variants": variants,
        "decode_speedup": {
            "routed_compiled_vs_dense_compiled": routed_gain,
            "oracle_compiled_vs_dense_compiled": oracle_gain,
            "routed_share_of_oracle_gain": _share(routed_gain, oracle_gain),
            "routed_scored_compiled_vs_dense_compiled": scored_gain,
            "routed_scored_share_of_oracle_gain": _share(scored_gain, oracle_gain),
            "routed_scored_regions_vs_dense_compiled": regions_gain,
            "routed_scored_regions_share_of_oracle_gain": _share(regions_gain, oracle_gain),
            "routed_compiled_vs_dense_compiled_cpu": speedup(
                "dense_compiled", "routed_compiled", "decode_cpu_s"
            ),
            "oracle_compiled_vs_dense_compiled_cpu": speedup(
                "dense_compiled", "oracle_compiled", "decode_cpu_s"
            ),
            "dense_compiled_vs_dense_eager": speedup("dense_eager", "dense_compiled"),
            "routed_compiled_vs_routed_eager": speedup("routed_eager", "routed_compiled"),
            "routed_eager_vs_dense_eager": speedup("dense_eager", "routed_eager"),
        },
        "load_average": {"start": load_start, "end": load_average()},
    }


def _share(gain: float | None, oracle: float | None) -> float | None:
    """How much of the oracle's gain the routed model gets: (routed - 1) / (oracle - 1)."""
    if gain is None or oracle is None or abs(oracle - 1.0) < 1e-9:
        return None
    return (gain - 1.0) / (oracle - 1.0)


def compiled_cell_line(cell: dict[str, Any]) -> str:
    s = cell["decode_speedup"]
    oracle = s["oracle_compiled_vs_dense_compiled"]
    return (
        f"context {cell['context']} batch {cell['batch']}: decode routed/dense compiled "
        f"{s['routed_compiled_vs_dense_compiled']:.3f}x, oracle "
        + ("-" if oracle is None else f"{oracle:.3f}x")
        + f", dense compiled/eager {s['dense_compiled_vs_dense_eager']:.3f}x"
    )


def compiled_results_table(report: dict[str, Any]) -> str:
    """Markdown: per cell, decode tok/s and the speedups of each variant against compiled dense."""

    def f(x: float | None, spec: str = ".3f") -> str:
        return "-" if x is None else f"{x:{spec}}"

    head = (
        "| context | batch | tok/s: dense eager | dense compiled | routed eager "
        "| vs dense compiled: routed (fixed route) | scored (ops) | scored + regions | oracle "
        "| share of oracle gain: routed / scored / regions | dense compiled vs eager | same tokens |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|\n"
    )
    rows = []
    for cell in report["results"]:
        v, s = cell["variants"], cell["decode_speedup"]
        rate = {
            name: f(v[name]["decode_tokens_per_s"], ".1f") if name in v else "-" for name in COMPILED_VARIANTS
        }
        shares = " / ".join(
            f(s.get(k), ".2f")
            for k in (
                "routed_share_of_oracle_gain",
                "routed_scored_share_of_oracle_gain",
                "routed_scored_regions_share_of_oracle_gain",
            )
        )
        same = all(x["tokens_equal_eager"] for x in v.values())
        rows.append(
            f"| {cell['context']} | {cell['batch']} | {rate['dense_eager']} | {rate['dense_compiled']} "
            f"| {rate['routed_eager']} | {f(s.get('routed_compiled_vs_dense_compiled'))} "
            f"| {f(s.get('routed_scored_compiled_vs_dense_compiled'))} "
            f"| {f(s.get('routed_scored_regions_vs_dense_compiled'))} "
            f"| {f(s.get('oracle_compiled_vs_dense_compiled'))} | {shares} "
            f"| {f(s.get('dense_compiled_vs_dense_eager'))} | {'yes' if same else 'NO'} |"
        )
    return head + "\n".join(rows) + "\n"

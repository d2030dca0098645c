"""Dense vs routed speed in one process, against the ideal set by the work actually skipped.

    from routertune.benchmark import BenchSettings, load_bench_model, run_benchmark
    model, name = load_bench_model("random:llama-1b")
    report = run_benchmark(model, BenchSettings(contexts=(512,), batches=(1,), skip_ratio=0.5), name=name)

One model object is timed in up to four variants, interleaved within every repeat (the order
rotates from one repeat to the next so none always runs first):

* ``dense``: routers detached, the plain transformers model (the baseline of every speedup);
* ``all_kept``: routers attached, every unit kept at threshold 0 (the routing overhead);
* ``routed``: the routers' own decisions (or the ones forced by ``skip_ratio``);
* ``oracle``: routers detached and the sub-layers the routed run skipped DELETED (replaced by a
  module that returns zeros and stores no KV): the physical limit of skipping them. Defined
  when every routed layer kept all or none of its units (always the case with ``skip_ratio``).

Prefill is one forward over ``context`` random tokens into a fresh ``DynamicCache``, keeping only
the last position's logits (as ``generate`` does); decode is ``new_tokens`` greedy single-token
forwards on that cache in a plain loop. The loop, not ``generate()``, so the clock sees the model
and not generate's per-step bookkeeping (logits processors, stopping checks that synchronise),
which is the same for every variant and would only dilute the ratios. Per-layer capacity is read
with ``track_capacity`` in a separate untimed probe run (observers force scoring and would tax the
timed runs). The ideal speedup is ``FLOPs(dense) / FLOPs(routed)`` from :mod:`routertune.benchmark.flops`
with those capacities.
"""

from routertune.benchmark.presets import PRESETS, Preset, build_random_model, load_bench_model
from routertune.benchmark.settings import SCHEMA, VARIANTS, BenchError, BenchSettings, parse_sizes
from routertune.benchmark.suite import run_benchmark
from routertune.benchmark.tables import results_table
from routertune.benchmark.timing import RunResult, interleaved_runs, timed_generation
from routertune.benchmark.variants import (
    force_skip,
    forced_skip_layers,
    routers_detached,
    sublayers_deleted,
    variant,
)

__all__ = [
    "PRESETS",
    "SCHEMA",
    "VARIANTS",
    "BenchError",
    "BenchSettings",
    "Preset",
    "RunResult",
    "build_random_model",
    "force_skip",
    "forced_skip_layers",
    "interleaved_runs",
    "load_bench_model",
    "parse_sizes",
    "results_table",
    "routers_detached",
    "run_benchmark",
    "sublayers_deleted",
    "timed_generation",
    "variant",
]

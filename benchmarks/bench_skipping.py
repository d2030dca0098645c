"""The skipping benchmark: plain model vs routers-all-kept vs skipping vs sub-layers deleted.

    OMP_NUM_THREADS=2 /work/venv/bin/python benchmarks/bench_skipping.py --suite smollm2
    OMP_NUM_THREADS=2 /work/venv/bin/python benchmarks/bench_skipping.py --suite smollm2-long
    OMP_NUM_THREADS=2 /work/venv/bin/python benchmarks/bench_skipping.py --suite llama-1b
    OMP_NUM_THREADS=2 /work/venv/bin/python benchmarks/bench_skipping.py --suite llama-1b-batch

For each suite (one process, one model object): ``attn_sequence`` routers on the default 16 deep
layers, the deepest half of them forced to skip (``skip_ratio 0.5``), timed in four variants,
interleaved: ``dense`` (routers detached), ``all_kept`` (routers at threshold 0: the overhead
target is within 2%), ``routed`` (skipping), ``oracle`` (the skipped attention sub-layers
deleted). The goal checked: measured/ideal >= 0.9 for prefill and decode, every cell.

Each suite fits one run of about 15 minutes on 2 quiet cores, so the grid is split into suites
(see SUITES); the ~1B random Llama does not run 2048 x 8 (several minutes per prefill here). Results are merged into benchmarks/results/bench_skipping.json (one entry
per suite) and the Markdown summary benchmarks/results/bench_skipping.md is rewritten from it.
Run when ``uptime`` shows a load well under the core count: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from routertune import RouterConfig, attach_routers
from routertune.benchmark import BenchSettings, load_bench_model, results_table, run_benchmark
from routertune.io_utils import atomic_write_text

RESULTS = Path(__file__).parent / "results"
GOAL_RATIO = 0.9
GOAL_OVERHEAD = 0.02

# suite -> model and groups of cells; each group is one BenchSettings (cells of a group share
# repeats and decode length). The 2048-token cells get fewer repeats/decode steps to fit the run.
SUITES: dict[str, dict[str, Any]] = {
    "smollm2": {
        "model": "smollm2-135m-instruct",
        "groups": [
            dict(contexts=(512,), batches=(1, 8), new_tokens=32, repeats=5),
            dict(contexts=(2048,), batches=(1,), new_tokens=32, repeats=5),
        ],
    },
    "smollm2-long": {  # 16k prompt tokens per prefill: about a minute each on 2 cores
        "model": "smollm2-135m-instruct",
        "groups": [dict(contexts=(2048,), batches=(8,), new_tokens=16, repeats=3)],
    },
    "llama-1b": {
        "model": "random:llama-1b",
        "groups": [
            dict(contexts=(512,), batches=(1,), new_tokens=16, repeats=3),
            dict(contexts=(2048,), batches=(1,), new_tokens=8, repeats=3),
        ],
    },
    "llama-1b-batch": {
        "model": "random:llama-1b",
        "groups": [dict(contexts=(512,), batches=(8,), new_tokens=8, repeats=3)],
    },
    "tiny": {  # a smoke test of this script (seconds)
        "model": "random:llama-tiny",
        "groups": [dict(contexts=(32,), batches=(1, 2), new_tokens=4, repeats=2)],
    },
}


def run_suite(name: str, threads: int, skip_ratio: float, warmup: int) -> dict[str, Any]:
    suite = SUITES[name]
    torch.set_num_threads(threads)
    started = time.perf_counter()
    model, display = load_bench_model(suite["model"])
    attach_routers(model, RouterConfig(granularity="attn_sequence", router_layers=16))
    merged: dict[str, Any] | None = None
    for group in suite["groups"]:
        settings = BenchSettings(skip_ratio=skip_ratio, warmup=warmup, **group)
        report = run_benchmark(
            model, settings, name=display, progress=lambda line: print(f"{name}: {line}", file=sys.stderr, flush=True)
        )
        if merged is None:
            merged = report
            merged["settings"] = [report["settings"]]
        else:
            merged["results"] += report["results"]
            merged["settings"].append(report["settings"])
            merged["environment"]["load_average_end"] = report["environment"]["load_average_end"]
    merged["suite"] = name
    merged["wall_s"] = time.perf_counter() - started
    merged["goals"] = goals(merged)
    return merged


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """measured/ideal >= 0.9 and all-kept overhead <= 2%, per cell and phase, by wall-clock and
    by CPU time (the latter is immune to waiting for a core on a shared machine)."""
    checks = []
    for cell in report["results"]:
        for phase in ("prefill", "decode"):
            s = cell["speedup"][phase]
            overhead, overhead_cpu = s["all_kept_overhead"], s["all_kept_overhead_cpu"]
            checks.append({
                "context": cell["context"],
                "batch": cell["batch"],
                "phase": phase,
                "measured_over_ideal": s["measured_over_ideal"],
                "measured_cpu_over_ideal": s["measured_cpu_over_ideal"],
                "ratio_ok": s["measured_over_ideal"] >= GOAL_RATIO,
                "ratio_ok_cpu": s["measured_cpu_over_ideal"] >= GOAL_RATIO,
                "all_kept_overhead": overhead,
                "all_kept_overhead_cpu": overhead_cpu,
                "overhead_ok": overhead is not None and overhead <= GOAL_OVERHEAD,
                "overhead_ok_cpu": overhead_cpu is not None and overhead_cpu <= GOAL_OVERHEAD,
            })
    return {
        "ratio_goal": GOAL_RATIO,
        "overhead_goal": GOAL_OVERHEAD,
        "all_ratios_ok": all(c["ratio_ok"] for c in checks),
        "all_ratios_ok_cpu": all(c["ratio_ok_cpu"] for c in checks),
        "all_overheads_ok": all(c["overhead_ok"] for c in checks),
        "all_overheads_ok_cpu": all(c["overhead_ok_cpu"] for c in checks),
        "checks": checks,
    }


def _goal_line(checks: list[dict[str, Any]], ok: str, value: str, text: str, fmt) -> str:
    failed = [c for c in checks if not c[ok]]
    if not failed:
        return f"{text}: met in every cell"
    return f"{text}: NOT met in " + ", ".join(
        f"{c['context']}x{c['batch']} {c['phase']} ({fmt(c[value])})" for c in failed
    )


def markdown(runs: dict[str, Any]) -> str:
    lines = [
        "# bench_skipping (generated by benchmarks/bench_skipping.py)",
        "",
        "attn_sequence routers on the 16 deepest layers (last excluded), the deepest half forced to skip. "
        "Speedups are medians of per-repeat paired ratios against the plain model; ideal = FLOPs(dense) / "
        "FLOPs(routed); oracle = the skipped attention sub-layers deleted; all-kept overhead = routers at "
        "threshold 0 vs the plain model. See docs/benchmarks.md.",
        "",
    ]
    for name, report in runs.items():
        env = report["environment"]
        g = report["goals"]
        lines += [
            f"## {name}: {report['model']}",
            "",
            f"{env['device']} {env['dtype']}, {env['threads']} threads, {env['cpu']} ({env['cpu_count']} cores); "
            f"load average (1/5/15 min) {env['load_average_start']} at start, {env.get('load_average_end')} at end; "
            f"{env['time']}; {report['wall_s'] / 60:.1f} min; skipped layers {report['skip']['layers']} of "
            f"{report['routed_layers']}.",
            "",
            results_table(report),
        ]
        ratio = lambda x: f"{x:.3f}"  # noqa: E731
        pct = lambda x: f"{100 * x:+.1f}%"  # noqa: E731
        checks = g["checks"]
        lines += [
            "- " + _goal_line(checks, "ratio_ok", "measured_over_ideal", f"measured/ideal >= {g['ratio_goal']}", ratio),
            "- " + _goal_line(checks, "ratio_ok_cpu", "measured_cpu_over_ideal",
                              f"same by CPU time (measured_cpu/ideal >= {g['ratio_goal']})", ratio),
            "- " + _goal_line(checks, "overhead_ok", "all_kept_overhead",
                              f"all-kept overhead <= {100 * g['overhead_goal']:.0f}%", pct),
            "- " + _goal_line(checks, "overhead_ok_cpu", "all_kept_overhead_cpu", "same by CPU time", pct),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="plain vs all-kept vs skipping vs deleted sub-layers")
    parser.add_argument("--suite", choices=sorted(SUITES))
    parser.add_argument("--render", action="store_true", help="only rewrite the .md (and goals) from the .json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_ratio", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_skipping")
    args = parser.parse_args(argv)
    json_path = args.out.with_suffix(".json")
    if args.render:
        runs = json.loads(json_path.read_text())["runs"]
        for report in runs.values():
            report["goals"] = goals(report)
        atomic_write_text(json_path, json.dumps({"schema": "routertune.bench_skipping/1", "runs": runs}, indent=2) + "\n")
        atomic_write_text(args.out.with_suffix(".md"), markdown(runs))
        return
    if args.suite is None:
        parser.error("--suite is required (or --render)")
    print(f"{args.suite}: load average {os.getloadavg()}", file=sys.stderr, flush=True)
    report = run_suite(args.suite, args.threads, args.skip_ratio, args.warmup)
    runs = json.loads(json_path.read_text())["runs"] if json_path.exists() else {}
    runs[args.suite] = report
    atomic_write_text(json_path, json.dumps({"schema": "routertune.bench_skipping/1", "runs": runs}, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), markdown(runs))
    print(markdown({args.suite: report}))


if __name__ == "__main__":
    main()

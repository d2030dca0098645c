"""Text of a benchmark report: one line per cell while it runs, a Markdown table after."""

from __future__ import annotations

from typing import Any


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def cell_line(cell: dict[str, Any]) -> str:
    s = cell["speedup"]
    return (
        f"context {cell['context']} batch {cell['batch']}: prefill {s['prefill']['measured']:.3f}x "
        f"(ideal {s['prefill']['ideal']:.3f}x), decode {s['decode']['measured']:.3f}x "
        f"(ideal {s['decode']['ideal']:.3f}x)"
    )


def results_table(report: dict[str, Any]) -> str:
    """A Markdown table of one report: per cell and phase, speeds, speedups and KV bytes."""
    head = (
        "| context | batch | phase | dense tok/s | routed tok/s | speedup | ideal | measured/ideal "
        "| CPU-time speedup | oracle speedup | all-kept overhead | KV dense MiB | KV routed MiB |\n"
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for cell in report["results"]:
        v = cell["variants"]
        for phase in ("prefill", "decode"):
            s = cell["speedup"][phase]
            overhead = s["all_kept_overhead"]
            rows.append(
                f"| {cell['context']} | {cell['batch']} | {phase} "
                f"| {v['dense'][f'{phase}_tokens_per_s']:.1f} | {v['routed'][f'{phase}_tokens_per_s']:.1f} "
                f"| {s['measured']:.3f} | {s['ideal']:.3f} | {s['measured_over_ideal']:.3f} "
                f"| {s['measured_cpu']:.3f} | {_fmt(s['oracle_measured'], '.3f')} "
                f"| {_fmt(None if overhead is None else 100 * overhead, '+.1f', '%')} "
                f"| {cell['kv_cache_bytes']['dense'] / 2**20:.1f} | {cell['kv_cache_bytes']['routed'] / 2**20:.1f} |"
            )
    return head + "\n".join(rows) + "\n"

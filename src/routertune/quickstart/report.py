"""The quickstart report: report.md and plots, from the results the quickstart collected.

Every number the report shows is first put into ``results["summary"]`` (:func:`summarize`),
which the quickstart saves in ``results.json``; the markdown only formats those numbers, so the
two never disagree (tests/test_quickstart.py checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routertune.io_utils import atomic_path, atomic_write_text

# The paper's headline result the report compares against (Router-Tuning / MindSkip, EMNLP 2025).
PAPER_HEADLINE = {
    "model": "Llama-3-8B",
    "granularity": "attn_sequence",
    "dense_average": 69.7,
    "routed_average": 69.4,
    "speedup": 1.21,
}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _points(x: float | None, stderr: float | None) -> str:
    """A paired difference in accuracy points, with its standard error."""
    return "" if x is None else f"{100 * x:+.2f} +- {100 * stderr:.2f}"


def _metric(entry: dict[str, Any], task: str) -> tuple[str, float | None]:
    from routertune.tasks import primary_metric

    metric = primary_metric(task, entry)
    return metric, entry.get(metric)


def _speedups(bench: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Context -> the cell's measured speedups, FLOP ideals, tok/s and KV bytes (batch as run)."""
    out: dict[str, dict[str, Any]] = {}
    for cell in (bench or {}).get("results") or []:
        v, s = cell["variants"], cell["speedup"]
        out[str(cell["context"])] = {
            "batch": cell["batch"],
            "kept_on_bench_prompt": (cell.get("capacity_overall") or {}).get("prefill"),
            **{
                f"{phase}_{key}": value
                for phase in ("prefill", "decode")
                for key, value in (
                    ("speedup", s[phase]["measured"]),
                    ("ideal", s[phase]["ideal"]),
                    ("dense_tps", v["dense"][f"{phase}_tokens_per_s"]),
                    ("model_tps", v["routed"][f"{phase}_tokens_per_s"]),
                )
            },
            "kv_dense_bytes": cell["kv_cache_bytes"]["dense"],
            "kv_model_bytes": cell["kv_cache_bytes"]["routed"],
        }
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers of the report: one row per model (dense first, then the points in order),
    paired differences vs dense and, for routed points, vs the attention drop of the same
    compute (evaluated on the same documents), and the measured speedups."""
    from routertune.evaluation.scores import paired_difference

    dense = results.get("eval_dense") or {}
    points = results.get("points") or []
    by_name = {"dense": {"eval": dense}, **{p["name"]: p for p in points}}

    def diff(first: dict[str, Any] | None, second: dict[str, Any]) -> dict[str, float | None]:
        if not first or not first.get("tasks") or not second.get("tasks"):
            return {"difference": None, "stderr": None}
        d = paired_difference(first, second)
        return {"difference": d["difference"], "stderr": d["stderr"]}

    rows = [
        {
            "name": "dense",
            "kind": "dense",
            "capacity": 1.0,
            "average": (dense.get("average") or {}).get("value"),
        }
    ]
    for p in points:
        ev = p.get("eval") or {}
        row = {
            "name": p["name"],
            "kind": p["kind"],
            "capacity": p.get("capacity"),
            "average": (ev.get("average") or {}).get("value"),
            "vs_dense": diff(dense, ev),
            "speed": _speedups(p.get("bench")),
        }
        if p["kind"] == "routed":
            row["target_capacity"] = p.get("target_capacity")
            row["same_compute_drop"] = p.get("same_compute_drop")
            drop = by_name.get(p.get("same_compute_drop") or "")
            row["vs_drop"] = diff(drop.get("eval") if drop else None, ev)
        else:
            row["dropped"] = p.get("dropped")
        rows.append(row)

    tasks = []
    for task, entry in (dense.get("tasks") or {}).items():
        metric, value = _metric(entry, task)
        scores = {"dense": value}
        for p in points:
            other = ((p.get("eval") or {}).get("tasks") or {}).get(task)
            scores[p["name"]] = _metric(other, task)[1] if other else None
        tasks.append({"task": task, "metric": metric, "samples": entry.get("samples"), "scores": scores})
    return {"rows": rows, "tasks": tasks, "paper": dict(PAPER_HEADLINE)}


def plot_accuracy(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["tasks"]
    labels = [row["name"] for row in summary["rows"]]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks)), 3.6))
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, [100 * (t["scores"][label] or 0.0) for t in tasks], width, label=label)
    ax.set_xticks(range(len(tasks)), [t["task"] for t in tasks], rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy per task (primary metric)")
    ax.legend(frameon=False, ncols=min(len(labels), 5), fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_tradeoff(summary: dict[str, Any], path: Path) -> Path:
    """Average accuracy against capacity: routed points and attention drops, dense at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for kind, marker in (("dense", "s"), ("routed", "o"), ("drop", "^")):
        rows = [r for r in summary["rows"] if r["kind"] == kind and r["average"] is not None]
        if rows:
            ax.plot([r["capacity"] for r in rows], [100 * r["average"] for r in rows], marker, label=kind)
            for r in rows:
                ax.annotate(r["name"], (r["capacity"], 100 * r["average"]), fontsize="x-small",
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("capacity (share of routed attention units kept)")
    ax.set_ylabel("average accuracy (%)")
    ax.legend(frameon=False, fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_capacity(per_layer: dict[str, float | None], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(per_layer, key=int)
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(layers)), 3.0))
    ax.bar([int(i) for i in layers], [100 * (per_layer[i] or 0.0) for i in layers], color="tab:orange")
    ax.set_xlabel("layer")
    ax.set_ylabel("units kept (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Routed model: share of routed units kept per layer (during evaluation)")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def write_report(results: dict[str, Any], out: str | Path) -> Path:
    """Writes report.md and its plots into ``out`` and ``results["summary"]``; returns the
    report's path."""
    out = Path(out)
    summary = results["summary"] = summarize(results)
    rows = summary["rows"]
    contexts = sorted({c for r in rows for c in r.get("speed", {})}, key=int)
    s = results.get("settings", {})
    train = results.get("train") or {}
    lines: list[str] = ["# routertune quickstart report", ""]
    lines += [
        f"Model: `{train.get('model')}`; routers: `{s.get('granularity')}` on "
        f"{len((train.get('router_config') or {}).get('layers') or []) or s.get('router_layers')} layers; "
        f"trained on {train.get('train_examples')} builtin examples ({train.get('steps')} steps, "
        f"{_minutes(results, 'train')}).",
        f"Evaluation: {s.get('limit')} documents per task"
        + (
            f" ({s.get('mmlu_limit')} per MMLU subject)"
            if "mmlu" in {t["task"] for t in summary["tasks"]}
            else ""
        )
        + ", zero-shot, offline lm-eval tasks, every model on the same documents; capacity: the share of "
        "routed attention units kept, measured during evaluation.",
        "",
    ]
    val = train.get("validation")
    if val:
        cap = (val["routed"].get("capacity") or {}).get("overall")
        lines += [
            "## Held-out LM loss (builtin examples never trained on)",
            "",
            "| model | loss | perplexity | capacity |",
            "|---|---:|---:|---:|",
            f"| dense | {val['dense']['loss']:.4f} | {val['dense']['perplexity']:.2f} | 100% |",
            f"| routed | {val['routed']['loss']:.4f} | {val['routed']['perplexity']:.2f} | {_pct(cap)}% |",
            "",
        ]

    speed_header = "".join(f" prefill {c} | decode {c} |" for c in contexts)
    lines += [
        "## The trade-off",
        "",
        "Each routed point beside the attention drop of the same compute (the least important "
        "attention layers removed for every input, as many as the routed point skips on average). "
        "`routed` is the trained routers at their own threshold; `routed@C` the same routers "
        "recalibrated to keep C of the routed units on held-out instruction prompts "
        "(`routertune calibrate`, thresholds only). Differences are paired over the same documents, "
        "in accuracy points, +- one standard error: within about two standard errors they are noise. "
        "Speedups are measured against the dense model at batch "
        f"{s.get('bench_batch')} ({s.get('bench_new_tokens')} decode steps).",
        "",
        f"| model | capacity | average | vs dense | vs drop of the same compute |{speed_header}",
        "|---|---:|---:|---:|---:|" + "---:|" * (2 * len(contexts)),
    ]
    for r in rows:
        vs_dense = r.get("vs_dense") or {}
        vs_drop = r.get("vs_drop") or {}
        drop_cell = (
            f"{_points(vs_drop.get('difference'), vs_drop.get('stderr'))} ({r['same_compute_drop']})"
            if vs_drop.get("difference") is not None
            else ""
        )
        speed = "".join(
            f" {_x(r['speed'][c]['prefill_speedup'])} | {_x(r['speed'][c]['decode_speedup'])} |"
            if c in r.get("speed", {})
            else " | |"
            for c in contexts
        )
        lines.append(
            f"| {r['name']} | {r['capacity']:.3f} | {_pct(r['average'])} "
            f"| {_points(vs_dense.get('difference'), vs_dense.get('stderr'))} | {drop_cell} |{speed}"
        )
    drops = [r for r in rows if r["kind"] == "drop"]
    lines += [
        "",
        "Dropped attention layers: " + "; ".join(f"{r['name']}: {r['dropped']}" for r in drops) + "."
        if drops
        else "",
        "",
        "![trade-off](tradeoff.png)",
        "",
    ]

    lines += [
        "## Accuracy per task",
        "",
        "| task | metric | n | " + " | ".join(r["name"] for r in rows) + " |",
        "|---|---|---:|" + "---:|" * len(rows),
    ]
    for t in summary["tasks"]:
        lines.append(
            f"| {t['task']} | {t['metric']} | {t['samples']} | "
            + " | ".join(_pct(t["scores"].get(r["name"])) for r in rows)
            + " |"
        )
    lines += ["", "![accuracy](accuracy.png)", ""]
    native = next((p for p in results.get("points") or [] if p["name"] == "routed"), None)
    per_layer = ((native or {}).get("eval") or {}).get("capacity", {}).get("per_layer")
    if per_layer:
        plot_capacity(per_layer, out / "capacity.png")
        lines += ["![capacity per layer](capacity.png)", ""]

    if contexts:
        lines += [
            "## Speed (one process, dense and each model interleaved, medians of repeats)",
            "",
            "| model | context | phase | dense tok/s | model tok/s | speedup | ideal (FLOPs) | KV dense MiB "
            "| KV model MiB |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            for c in contexts:
                cell = r.get("speed", {}).get(c)
                if cell is None:
                    continue
                for phase in ("prefill", "decode"):
                    lines.append(
                        f"| {r['name']} | {c} | {phase} | {cell[f'{phase}_dense_tps']:.1f} "
                        f"| {cell[f'{phase}_model_tps']:.1f} | {_x(cell[f'{phase}_speedup'])} "
                        f"| {_x(cell[f'{phase}_ideal'])} | {cell['kv_dense_bytes'] / 2**20:.1f} "
                        f"| {cell['kv_model_bytes'] / 2**20:.1f} |"
                    )
        lines += [
            "",
            "A routed model decides on the benchmark's own (random) prompt, so its speed is that of "
            "the layers it skipped there; the FLOP ideal is for those layers. tok/s: median over "
            "repeats; speedup: median of the per-repeat ratios of runs made side by side.",
            "",
        ]
    p = summary["paper"]
    native_row = next((r for r in rows if r["name"] == "routed"), None)
    lines += [
        "## Against the paper's headline",
        "",
        f"The paper reports {p['model']} {p['granularity']}: average {p['dense_average']:.1f} -> "
        f"{p['routed_average']:.1f} at {p['speedup']:.2f}x. Here ({train.get('model')}): average "
        f"{_pct(rows[0]['average'])} -> {_pct(native_row['average'] if native_row else None)} at capacity "
        f"{native_row['capacity'] if native_row else 0:.3f}; measured speedups are in the tables above.",
        "",
        f"Full numbers: `results.json`. Wall time: {results.get('wall_time_s', 0) / 60:.1f} min.",
        "",
    ]
    plot_tradeoff(summary, out / "tradeoff.png")
    if summary["tasks"]:
        plot_accuracy(summary, out / "accuracy.png")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _minutes(results: dict[str, Any], key: str) -> str:
    t = (results.get("timings_s") or {}).get(key)
    return "-" if t is None else f"{t / 60:.1f} min"

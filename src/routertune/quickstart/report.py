"""The quickstart report: report.md, plots, from the results the quickstart collected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routertune.io_utils import atomic_path, atomic_write_text

MODELS = (("dense", "eval_dense"), ("routed", "eval_routed"), ("attention drop", "eval_drop"))
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


def _metric(entry: dict[str, Any], task: str) -> tuple[str, float | None]:
    from routertune.tasks import primary_metric

    metric = primary_metric(task, entry)
    return metric, entry.get(metric)


def accuracy_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: metric name, samples, and the score of each evaluated model."""
    dense = results.get("eval_dense") or {}
    rows = []
    for task, entry in (dense.get("tasks") or {}).items():
        metric, _ = _metric(entry, task)
        row = {"task": task, "metric": metric, "samples": entry.get("samples")}
        for label, key in MODELS:
            other = ((results.get(key) or {}).get("tasks") or {}).get(task)
            row[label] = _metric(other, task)[1] if other else None
        rows.append(row)
    return rows


def _bench_cell(results: dict[str, Any], key: str) -> dict[str, Any] | None:
    bench = results.get(key)
    if not bench or not bench.get("results"):
        return None
    return bench["results"][0]


def speed_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, key in (("routed", "bench_routed"), ("attention drop", "bench_drop")):
        cell = _bench_cell(results, key)
        if cell is None:
            continue
        for phase in ("prefill", "decode"):
            s = cell["speedup"][phase]
            v = cell["variants"]
            rows.append(
                {
                    "model": label,
                    "phase": phase,
                    "context": cell["context"],
                    "batch": cell["batch"],
                    "dense_tps": v["dense"][f"{phase}_tokens_per_s"],
                    "model_tps": v["routed"][f"{phase}_tokens_per_s"],
                    "speedup": s["measured"],
                    "ideal": s["ideal"],
                    "ratio": s["measured_over_ideal"],
                    "kv_dense": cell["kv_cache_bytes"]["dense"],
                    "kv_model": cell["kv_cache_bytes"]["routed"],
                }
            )
    return rows


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in MODELS]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 3.6))
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(rows))]
        ys = [100 * (r[label] or 0.0) for r in rows]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(rows)), [r["task"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy per task (primary metric)")
    ax.legend(frameon=False, ncols=len(labels))
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


def write_report(results: dict[str, Any], out: str | Path) -> Path:
    """Writes report.md and its plots into ``out``; returns the report's path."""
    out = Path(out)
    rows = accuracy_rows(results)
    lines: list[str] = ["# routertune quickstart report", ""]
    s = results.get("settings", {})
    train = results.get("train") or {}
    routed_eval = results.get("eval_routed") or {}
    capacity = (routed_eval.get("capacity") or {}).get("overall")
    lines += [
        f"Model: `{train.get('model')}`; routers: `{s.get('granularity')}` on "
        f"{len((train.get('router_config') or {}).get('layers') or []) or s.get('router_layers')} layers; "
        f"trained on {train.get('train_examples')} builtin examples ({train.get('steps')} steps, "
        f"{_minutes(results, 'train')}).",
        f"Evaluation: {s.get('limit')} documents per task ({s.get('mmlu_limit')} per MMLU subject), zero-shot, "
        "offline lm-eval tasks. Small samples: differences of a few points are within noise.",
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
    lines += [
        "## Accuracy",
        "",
        "| task | metric | n | dense | routed | attention drop |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['samples']} | {_pct(r['dense'])} | {_pct(r['routed'])} "
            f"| {_pct(r['attention drop'])} |"
        )
    averages = {label: ((results.get(key) or {}).get("average") or {}).get("value") for label, key in MODELS}
    lines.append(
        f"| **average** | | | **{_pct(averages['dense'])}** | **{_pct(averages['routed'])}** "
        f"| **{_pct(averages['attention drop'])}** |"
    )
    drop = results.get("attention_drop") or {}
    lines += [
        "",
        f"Routed model capacity during evaluation: {_pct(capacity)}% of routed attention units kept. "
        f"Attention drop at the same compute removes layers {drop.get('dropped')} "
        f"({drop.get('n_drop')} of {len(drop.get('candidates') or [])} candidate layers).",
        "",
        "![accuracy](accuracy.png)",
        "",
    ]
    per_layer = (routed_eval.get("capacity") or {}).get("per_layer")
    if per_layer:
        plot_capacity(per_layer, out / "capacity.png")
        lines += ["![capacity per layer](capacity.png)", ""]
    if rows:
        plot_accuracy(rows, out / "accuracy.png")

    speed = speed_rows(results)
    if speed:
        lines += [
            "## Speed (one process, interleaved repeats, medians)",
            "",
            "| model | phase | context | batch | dense tok/s | model tok/s | speedup | ideal (FLOPs) "
            "| measured/ideal | KV dense MiB | KV model MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in speed:
            lines.append(
                f"| {r['model']} | {r['phase']} | {r['context']} | {r['batch']} | {r['dense_tps']:.1f} "
                f"| {r['model_tps']:.1f} | {r['speedup']:.3f}x | {r['ideal']:.3f}x | {r['ratio']:.2f} "
                f"| {r['kv_dense'] / 2**20:.1f} | {r['kv_model'] / 2**20:.1f} |"
            )
        lines += [
            "",
            "tok/s: median over repeats for each model on its own. Speedup: median of the per-repeat",
            "ratios dense/model, each from two runs made side by side; it can differ from the ratio of",
            "the tok/s columns when the machine's speed drifts between repeats.",
            "",
        ]
    p = PAPER_HEADLINE
    lines += [
        "## Against the paper's headline",
        "",
        f"The paper reports {p['model']} {p['granularity']}: average {p['dense_average']} -> "
        f"{p['routed_average']} at {p['speedup']}x. Here: average {_pct(averages['dense'])} -> "
        f"{_pct(averages['routed'])} at capacity {_pct(capacity)}%; measured speedups are in the table above.",
        "",
        f"Full numbers: `results.json`. Wall time: {results.get('wall_time_s', 0) / 60:.1f} min.",
        "",
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _minutes(results: dict[str, Any], key: str) -> str:
    t = (results.get("timings_s") or {}).get(key)
    return "-" if t is None else f"{t / 60:.1f} min"

"""Routing analysis: which layers skip how often, per task (the seed's routing analysis).

    routertune analyze --routers runs/rt --tasks arc_easy,boolq,piqa --limit 100

    from routertune.analyze import analyze_routing, write_analysis
    analysis = analyze_routing(model, tokenizer, ["arc_easy", "piqa"], limit=50)
    write_analysis(analysis, "runs/rt/analysis")   # analysis.json + skip_heatmap.png

Each evaluation task is run through lm-eval (:func:`routertune.evaluation.evaluate`, the
same offline tasks and prompts as ``routertune eval``, padding masked so that decisions do
not depend on batching) while the routers' decisions are counted per layer; an
``instructions`` column does the same on held-out built-in instruction examples (the tail
of the mix just before the examples ``routertune calibrate`` uses by default). A unit is what the routers
decide on: one forward row (an lm-eval request: context + continuation) for ``*_sequence``
routers, one non-padding token for ``*_token`` routers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

ANALYSIS_JSON = "analysis.json"
HEATMAP_PNG = "skip_heatmap.png"
INSTRUCTIONS_COLUMN = "instructions"


class AnalysisError(ValueError):
    """Invalid analysis request (no routers, nothing to analyse) or malformed analysis data."""


def _column(capacity: dict[str, Any], layers: list[int]) -> dict[str, Any]:
    """Skip shares of one task from a ``CapacityStats.as_dict()``."""
    counts = capacity.get("counts", {})
    per_layer = {}
    for i in layers:
        c = counts.get(str(i))
        per_layer[str(i)] = None if not c or not c["total"] else 1.0 - c["kept"] / c["total"]
    overall = capacity.get("overall")
    return {
        "skip_per_layer": per_layer,
        "skip_overall": None if overall is None else 1.0 - overall,
        "units_per_layer": max((c["total"] for c in counts.values()), default=0),
    }


def analyze_routing(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] | None = None,
    limit: int | float | None = 100,
    instructions: int = 64,
    batch_size: int = 8,
    max_length: int = 512,
    include_path: str | Path | None = None,
) -> dict[str, Any]:
    """Per-layer, per-task skip shares of a routed model.

    Args:
        model: a model with routers attached.
        tokenizer: its tokenizer.
        tasks: lm-eval task names (default: the nine offline tasks); empty for none.
        limit: documents per task (per MMLU subject), as ``routertune eval --limit``.
        instructions: held-out built-in instruction examples to add as a column (0: none).
        batch_size: requests / examples per forward pass.
        max_length: tokens per instruction example.
        include_path: extra lm-eval task folder.

    Returns:
        JSON-able dict: ``layers`` (routed layer indices), ``columns`` (task names, then
        ``instructions``), ``skip`` (``[layer][column]`` share of units skipped, None where a
        layer saw no unit), ``tasks`` ({column: skip_per_layer, skip_overall, units_per_layer,
        metric, value}), ``router_config`` and ``settings``.

    Raises:
        AnalysisError: the model has no routers, or there is neither a task nor an instruction.
    """
    from routertune.routing.attach import get_router_config, routed_layers
    from routertune.tasks import DEFAULT_TASKS, primary_metric

    config = get_router_config(model)
    if config is None:
        raise AnalysisError("the model has no routers to analyse; load routers first")
    task_list = list(DEFAULT_TASKS) if tasks is None else _split(tasks)
    if not task_list and instructions <= 0:
        raise AnalysisError("nothing to analyse: give tasks or instruction examples")
    layers = sorted(routed_layers(model))
    columns: dict[str, dict[str, Any]] = {}

    if task_list:
        from routertune.evaluation import evaluate

        results = evaluate(
            model, tokenizer, task_list, limit=limit, include_path=include_path, batch_size=batch_size
        )
        if results is None:  # launched as several processes: lm-eval gathered on the main one
            raise AnalysisError("routertune analyze runs in one process (data-parallel: routertune eval)")
        for name, entry in results["tasks"].items():
            column = _column(entry["capacity"] or {}, layers)
            metric = primary_metric(name, entry)
            column.update({"metric": metric, "value": entry.get(metric), "samples": entry.get("samples")})
            columns[name] = column

    if instructions > 0:
        from routertune.calibrate import DEFAULT_N, calibration_split, make_batches
        from routertune.routing.observe import measure_capacity

        # The examples just before the default calibration set: never calibrated on by default.
        _, held = calibration_split("builtin", n=DEFAULT_N, n_heldout=instructions)
        capacity = measure_capacity(
            model, make_batches(tokenizer, held, batch_size=batch_size, max_length=max_length)
        )
        column = _column(capacity, layers)
        column.update({"metric": None, "value": None, "samples": len(held)})
        columns[INSTRUCTIONS_COLUMN] = column

    names = list(columns)
    return {
        "model": getattr(model.config, "_name_or_path", None),
        "router_config": config.to_dict(),
        "granularity": config.granularity,
        "unit": "request" if config.unit == "sequence" else "token",
        "layers": layers,
        "columns": names,
        "skip": [[columns[c]["skip_per_layer"][str(i)] for c in names] for i in layers],
        "tasks": columns,
        "settings": {
            "limit": limit,
            "instructions": instructions,
            "batch_size": batch_size,
            "max_length": max_length,
        },
    }


def _split(tasks: str | Sequence[str]) -> list[str]:
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return [t.strip() for t in items if t and t.strip()]


def plot_skip_heatmap(analysis: dict[str, Any], path: str | Path) -> Path:
    """Writes a heatmap PNG: routed layers (rows) x tasks (columns), share of units skipped.

    Cells carry their percentage; empty cells (no unit seen) are grey. Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from routertune.io_utils import atomic_path

    layers, columns, skip = analysis.get("layers"), analysis.get("columns"), analysis.get("skip")
    if not layers or not columns or skip is None or len(skip) != len(layers):
        raise AnalysisError("analysis has no layers x columns skip matrix to plot")
    data = np.array([[np.nan if v is None else float(v) for v in row] for row in skip], dtype=float)
    if data.shape != (len(layers), len(columns)):
        raise AnalysisError(f"skip matrix has shape {data.shape}; expected ({len(layers)}, {len(columns)})")

    width = max(5.0, 1.0 + 0.95 * len(columns))
    height = max(3.5, 1.6 + 0.36 * len(layers))
    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#cccccc")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(columns)), labels=columns, rotation=35, ha="right")
    ax.set_yticks(range(len(layers)), labels=[str(i) for i in layers])
    ax.set_xlabel("task")
    ax.set_ylabel("layer")
    for r in range(data.shape[0]):
        for c in range(data.shape[1]):
            v = data[r, c]
            if not math.isnan(v):
                ax.text(
                    c,
                    r,
                    f"{100 * v:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if v > 0.6 else "white",
                )
    title = f"share of {analysis.get('unit', 'unit')}s skipped ({analysis.get('granularity', '')}), %"
    model_name = analysis.get("model")
    ax.set_title(f"{model_name}\n{title}" if model_name else title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share skipped")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_analysis(analysis: dict[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    """Writes ``analysis.json`` and ``skip_heatmap.png`` into ``output_dir`` (each atomically)."""
    import json

    from routertune.io_utils import atomic_write_text

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    png = plot_skip_heatmap(analysis, output_dir / HEATMAP_PNG)
    js = output_dir / ANALYSIS_JSON
    atomic_write_text(js, json.dumps(analysis, indent=2, sort_keys=True) + "\n")
    return js, png


def format_analysis(analysis: dict[str, Any]) -> str:
    """A text table: layers (rows) x columns, percent skipped, then each column's overall share."""
    columns = analysis["columns"]
    width = max(8, *(len(c) + 1 for c in columns))
    lines = ["layer" + "".join(f"{c:>{width}}" for c in columns)]
    for i, row in zip(analysis["layers"], analysis["skip"], strict=True):
        cells = "".join(f"{'-' if v is None else f'{100 * v:.1f}':>{width}}" for v in row)
        lines.append(f"{i:<5}{cells}")
    overall = [analysis["tasks"][c]["skip_overall"] for c in columns]
    lines.append("all  " + "".join(f"{'-' if v is None else f'{100 * v:.1f}':>{width}}" for v in overall))
    lines.append(f"(percent of {analysis['unit']}s skipped; {analysis['granularity']})")
    return "\n".join(lines)

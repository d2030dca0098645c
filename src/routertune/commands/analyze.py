"""``routertune analyze``: per-layer, per-task skip rates of a routed model, as JSON and a heatmap.

    routertune analyze --routers runs/rt --tasks arc_easy,boolq,piqa --limit 100
    routertune analyze --routers runs/rt --output_dir runs/rt/analysis

Runs the offline evaluation tasks (as ``routertune eval``) and held-out built-in instruction
examples through the routed model, counting per layer what its routers skip. Writes
``analysis.json`` and ``skip_heatmap.png`` (layers x tasks) into ``--output_dir`` (default:
``<routers>/analysis``) and prints the table.
"""

from __future__ import annotations

from pathlib import Path

import typer

from routertune.commands.common import checked_limit, device_option, dtype_option, fail, model_option
from routertune.tasks import DEFAULT_TASKS, TASK_PREFIX


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze_command)


def analyze_command(
    routers: Path = typer.Option(
        ..., "--routers", help="Router folder (router_config.json + routers.safetensors) to analyse."
    ),
    model: str = model_option(),
    tasks: str = typer.Option(
        ",".join(DEFAULT_TASKS),
        "--tasks",
        "-t",
        help="Comma-separated lm-eval task names ('' for none; default: the paper's 8 + arc_easy).",
    ),
    limit: float | None = typer.Option(
        100, "--limit", help="At most N documents per task (per MMLU subject); a value below 1 is a fraction."
    ),
    instructions: int = typer.Option(
        64, "--instructions", help="Held-out built-in instruction examples to add as a column (0: none)."
    ),
    output_dir: Path | None = typer.Option(
        None, "--output_dir", "--output-dir", help="Where to write analysis.json and skip_heatmap.png."
    ),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="Requests per forward pass."),
    max_length: int = typer.Option(
        512, "--max_length", "--max-length", help="Tokens per instruction example."
    ),
    include_path: Path | None = typer.Option(
        None, "--include_path", "--include-path", help="Extra folder of lm-eval task YAMLs."
    ),
    device: str | None = device_option(),
    dtype: str | None = dtype_option(),
) -> None:
    """Per-layer and per-task skip rates of a routed model: analysis.json and a heatmap PNG."""
    limit_value = checked_limit(limit)
    if instructions < 0 or batch_size < 1 or max_length < 1:
        fail("--instructions must be >= 0, --batch_size and --max_length >= 1")
    task_names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not task_names and instructions == 0:
        fail("nothing to analyse: give --tasks or --instructions > 0")

    from routertune.analyze import AnalysisError, analyze_routing, format_analysis, write_analysis
    from routertune.evaluation import EvaluationError, build_task_manager, resolve_tasks
    from routertune.loading import ModelResolutionError, load_model_and_tokenizer
    from routertune.routing.router_files import RouterLoadError, load_routers, read_router_files
    from routertune.tasks import OfflineDataError, olmo_datasets_root

    try:
        read_router_files(routers)
    except RouterLoadError as err:
        fail(str(err))
    if task_names:  # check names and data before the (slow) model load
        try:
            resolved = resolve_tasks(task_names, build_task_manager(include_path))
            if any(name.startswith(TASK_PREFIX) for name in resolved.values()):
                olmo_datasets_root()
        except (EvaluationError, OfflineDataError) as err:
            fail(str(err))
    try:
        lm, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=device)
        load_routers(lm, routers)
    except (ModelResolutionError, RouterLoadError, ValueError) as err:
        fail(str(err))

    try:
        analysis = analyze_routing(
            lm,
            tokenizer,
            task_names,
            limit=limit_value,
            instructions=instructions,
            batch_size=batch_size,
            max_length=max_length,
            include_path=include_path,
        )
    except (AnalysisError, EvaluationError, OfflineDataError) as err:
        fail(str(err))
    analysis["routers_path"] = str(routers)
    typer.echo(format_analysis(analysis))
    js, png = write_analysis(analysis, output_dir if output_dir is not None else routers / "analysis")
    typer.echo(f"analysis written to {js} and {png}", err=True)

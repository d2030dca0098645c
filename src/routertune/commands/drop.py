"""``routertune drop``: the static-drop baseline (attention, MLP or block), saved as a router folder.

    routertune drop --capacity 0.5 --output runs/drop-0.5
    routertune drop --unit mlp --capacity 0.75 --output runs/mlp-drop-0.75
    routertune eval --routers runs/drop-0.5 --limit 100
    routertune bench --routers runs/drop-0.5

Measures each candidate layer's importance for the unit (``1 - cos`` of the residual stream
before and after it, :mod:`routertune.baselines`) on instruction examples, drops the least
important units for every input, and writes ``router_config.json`` + ``routers.safetensors`` +
``attention_drop.json`` (``mlp_drop.json``, ``block_drop.json``). See docs/baselines.md.
"""

from __future__ import annotations

from pathlib import Path

import typer

from routertune.commands.common import device_option, dtype_option, fail, model_option


def register(app: typer.Typer) -> None:
    app.command("drop")(drop_command)


def drop_command(
    output: Path = typer.Option(
        ..., "--output", "-o", help="Router folder to write (replaced if it exists)."
    ),
    model: str = model_option(),
    unit: str = typer.Option(
        "attn", "--unit", help="What to drop: attn (attention), mlp or block (both), as the routers' granularity."
    ),
    capacity: float | None = typer.Option(
        None, "--capacity", help="Share of candidate units to keep (as a routed model's capacity)."
    ),
    n_drop: int | None = typer.Option(
        None, "--n_drop", "--n-drop", help="Number of units (layers' attention, MLP or block) to drop."
    ),
    router_layers: int = typer.Option(
        16,
        "--router_layers",
        "--router-layers",
        "--mod_n",
        help="Candidates: the layers routers with this --router_layers would route (deepest, minus the last).",
    ),
    data: str = typer.Option(
        "builtin",
        "--data",
        help="Calibration data: 'builtin' (tail of the built-in mix) or a unified jsonl file.",
    ),
    n: int = typer.Option(64, "--n", help="Calibration examples to measure importance on."),
    max_length: int = typer.Option(
        512, "--max_length", "--max-length", help="Tokens per example (cut beyond)."
    ),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="Examples per forward pass."),
    device: str | None = device_option(),
    dtype: str | None = dtype_option(),
) -> None:
    """Drop the least important attention / MLP / block units (static baseline) and save them as a router folder."""
    if (n_drop is None) == (capacity is None):
        fail("give exactly one of --n_drop and --capacity")
    if capacity is not None and not 0.0 <= capacity <= 1.0:
        fail(f"--capacity must be in [0, 1]; got {capacity:g}")
    if n_drop is not None and n_drop < 0:
        fail(f"--n_drop must be >= 0; got {n_drop}")
    from routertune.baselines import UNIT_NAMES, UNITS

    if unit not in UNITS:
        fail(f"--unit must be one of {', '.join(UNITS)}; got {unit!r}")
    if n < 1 or max_length < 1 or batch_size < 1 or router_layers < 1:
        fail("--n, --max_length, --batch_size and --router_layers must be >= 1")

    from routertune.baselines import (
        AttentionDropError,
        apply_drop,
        candidate_layers,
        drop_report,
        save_drop,
        sublayer_importance,
    )
    from routertune.calibrate import CalibrationError, calibration_split
    from routertune.data import DataFormatError
    from routertune.loading import ModelResolutionError, load_model_and_tokenizer

    try:
        fit, _ = calibration_split(data, n=n, n_heldout=0)
    except (CalibrationError, DataFormatError, FileNotFoundError) as err:
        fail(str(err))
    try:
        lm, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=device)
    except (ModelResolutionError, ValueError) as err:
        fail(str(err))

    try:
        name = UNIT_NAMES[unit]
        candidates = candidate_layers(lm, router_layers, unit)
        typer.echo(f"measuring {name} importance on {len(fit)} examples from {data}", err=True)
        importance = sublayer_importance(
            lm, tokenizer, fit, unit, batch_size=batch_size, max_length=max_length
        )
        dropped = apply_drop(
            lm, importance, n_drop=n_drop, capacity=capacity, candidates=candidates, unit=unit
        )
    except (AttentionDropError, CalibrationError) as err:
        fail(str(err))

    typer.echo(f"{'layer':>6}{'importance':>12}  {name}")
    for i in candidates:
        typer.echo(f"{i:>6}{importance[i]:>12.5f}  {'dropped' if i in dropped else 'kept'}")
    report = drop_report(importance, candidates, dropped, data=data, n_examples=len(fit), unit=unit)
    report["model"] = lm.config._name_or_path
    save_drop(lm, output, report)
    typer.echo(
        f"dropped {name} of layers {dropped} ({len(dropped)} of {len(candidates)} candidates, "
        f"capacity {report['capacity']:.4f}); router folder written to {output}"
    )

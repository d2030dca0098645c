"""``routertune calibrate``: set router thresholds for a target capacity, without retraining.

    routertune calibrate --routers runs/rt --target_capacity 0.5
    routertune calibrate --routers runs/rt --target_capacity 0.6 --method per_layer --output runs/rt-0.6

Records the routers' scores on instruction examples (sequence routers deciding on each
example's prompt, as generation and ``routertune eval`` route, unless ``--route_on all``),
sets one global (or per-layer) score quantile as keep thresholds so that the routed model
keeps the requested share of routed units, checks the share on held-out examples, and saves
the routers with their thresholds (``layer_thresholds`` in router_config.json) plus
``calibration.json``. See docs/baselines.md for the method and its measurements.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from routertune.commands.common import device_option, dtype_option, fail, fmt4, model_option


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_command)


def calibrate_command(
    routers: Path = typer.Option(
        ..., "--routers", help="Router folder (router_config.json + routers.safetensors) to calibrate."
    ),
    target_capacity: float = typer.Option(
        ..., "--target_capacity", "--target-capacity", help="Share of routed units to keep, in [0, 1]."
    ),
    model: str = model_option(),
    method: str = typer.Option(
        "global",
        "--method",
        help="global: one threshold for all routed layers (default); per_layer: each layer keeps the share.",
    ),
    data: str = typer.Option(
        "builtin",
        "--data",
        help="Calibration data: 'builtin' (tail of the built-in mix) or a unified jsonl file.",
    ),
    n: int = typer.Option(64, "--n", help="Calibration examples."),
    n_heldout: int = typer.Option(
        32, "--n_heldout", "--n-heldout", help="Further examples to check the achieved capacity on (0: none)."
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Folder to save into (default: the --routers folder, files replaced atomically).",
    ),
    max_length: int = typer.Option(
        512, "--max_length", "--max-length", help="Tokens per example (cut beyond)."
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch_size",
        "--batch-size",
        help="Examples per forward pass. Default: the whole calibration set in one pass (per_layer is then "
        "exact in one forward); a smaller value bounds memory (per_layer then takes one pass per routed layer).",
    ),
    max_passes: int = typer.Option(
        12, "--max_passes", "--max-passes", help="Most passes over the calibration data (global method)."
    ),
    route_on: str = typer.Option(
        "prompt",
        "--route_on",
        "--route-on",
        help="Tokens sequence routers decide on while calibrating: 'prompt' (the tokens before the answer, as "
        "generate and eval route; default) or 'all' (the whole conversation, as training without --route_on).",
    ),
    device: str | None = device_option(),
    dtype: str | None = dtype_option(),
) -> None:
    """Calibrate router thresholds so the routed model keeps a target share of routed units."""
    from routertune.calibrate import CALIBRATION_METHODS
    from routertune.data.encode import ROUTE_ON

    if not 0.0 <= target_capacity <= 1.0:
        fail(f"--target_capacity must be in [0, 1]; got {target_capacity:g}")
    if method not in CALIBRATION_METHODS:
        fail(f"--method must be one of {', '.join(CALIBRATION_METHODS)}; got {method!r}")
    if route_on not in ROUTE_ON:
        fail(f"--route_on must be 'prompt' or 'all'; got {route_on!r}")
    if (
        n < 1
        or n_heldout < 0
        or max_length < 1
        or (batch_size is not None and batch_size < 1)
        or max_passes < 1
    ):
        fail("--n, --max_length, --batch_size and --max_passes must be >= 1, --n_heldout >= 0")

    from routertune.calibrate import (
        CalibrationError,
        calibrate_thresholds,
        calibration_split,
        make_batches,
        save_calibrated,
    )
    from routertune.data import DataFormatError
    from routertune.loading import ModelResolutionError, load_model_and_tokenizer
    from routertune.routing.observe import measure_capacity
    from routertune.routing.router_files import (
        CONFIG_NAME,
        RouterLoadError,
        copy_adapter,
        load_routers,
        read_router_files,
    )

    # Cheap checks first: router files and data, before the model load.
    try:
        read_router_files(routers)
    except RouterLoadError as err:
        fail(str(err))
    try:
        fit, heldout = calibration_split(data, n=n, n_heldout=n_heldout)
    except (CalibrationError, DataFormatError, FileNotFoundError) as err:
        fail(str(err))
    try:
        lm, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=device)
    except (ModelResolutionError, ValueError) as err:
        fail(str(err))
    try:
        load_routers(lm, routers)
    except RouterLoadError as err:
        fail(str(err))

    try:
        fit_batches = make_batches(
            tokenizer, fit, batch_size=batch_size or len(fit), max_length=max_length, route_on=route_on
        )
        heldout_batches = (
            make_batches(tokenizer, heldout, batch_size=batch_size or 8, max_length=max_length, route_on=route_on)
            if heldout
            else []
        )
        typer.echo(
            f"calibrating {method} thresholds for capacity {target_capacity:g} on {len(fit)} examples from {data} "
            f"(routing on {'prompts' if route_on == 'prompt' else 'whole conversations'})",
            err=True,
        )
        result = calibrate_thresholds(lm, fit_batches, target_capacity, method=method, max_passes=max_passes)
        if heldout_batches:
            result.heldout = measure_capacity(lm, heldout_batches)
    except CalibrationError as err:
        fail(str(err))

    typer.echo(format_calibration(result.to_dict()))
    report = result.to_dict()
    report.update(
        {
            "model": lm.config._name_or_path,
            "source_routers": str(routers),
            "data": data,
            "n": len(fit),
            "n_heldout": len(heldout),
            "max_length": max_length,
            "route_on": route_on,
        }
    )
    destination = output if output is not None else routers
    save_calibrated(lm, destination, report)
    if copy_adapter(routers, destination):  # the routers go on with the LoRA they were trained with
        typer.echo(f"LoRA adapter of {routers} copied beside them", err=True)
    typer.echo(f"thresholds saved to {Path(destination) / CONFIG_NAME}", err=True)


def format_calibration(result: dict[str, Any]) -> str:
    """Per-layer thresholds and kept shares (calibration / held-out), then the overall line."""
    heldout = result.get("heldout") or {}
    held = heldout.get("per_layer", {})
    calib = result["calibration"]["per_layer"]
    lines = [f"{'layer':>6}{'threshold':>11}{'kept (calib)':>14}{'kept (held-out)':>17}"]
    for layer, threshold in result["thresholds"].items():
        lines.append(f"{layer:>6}{threshold:>11.4f}{fmt4(calib.get(layer)):>14}{fmt4(held.get(layer)):>17}")
    status = "reached" if result["converged"] else "NOT reached (closest kept)"
    lines.append(
        f"target capacity {result['target_capacity']:.4f} {status} in {result['passes']} pass(es): "
        f"calibration {fmt4(result['calibration']['overall'])}, held-out {fmt4(heldout.get('overall'))}"
    )
    return "\n".join(lines)

"""``routertune bench``: dense vs routed vs deleted sub-layers, measured against the ideal.

    routertune bench --model smollm2-135m-instruct --skip_ratio 0.5 --json bench.json
    routertune bench --model random:llama-1b --context 512 --batch 1,8 --skip_ratio 0.5
    routertune bench --model ./my-llama --routers runs/routers --device cuda
    routertune bench --compile --skip_ratio 0.5 --context 512,2048 --batch 1,8   # under torch.compile

The Markdown table goes to stdout, progress to stderr, the full report to ``--json``.
See docs/benchmarks.md for every field.
"""

from __future__ import annotations

from pathlib import Path

import typer

from routertune.commands.common import attn_option, dtype_option, fail
from routertune.loading import DEFAULT_MODEL
from routertune.routing.config import GRANULARITIES


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


def bench(
    model: str = typer.Option(
        DEFAULT_MODEL,
        "--model",
        "-m",
        help="Local folder, built-in name, hub id, or random:<preset> (random weights of a real shape: "
        "random:llama-tiny, random:smollm2-135m, random:qwen2-0.5b, random:llama-1b, random:tinyllama-1.1b, "
        "random:mistral-7b, random:llama-3-8b).",
    ),
    routers: Path | None = typer.Option(
        None, "--routers", help="Router folder to load; default: fresh zero routers (every unit kept)."
    ),
    context: str = typer.Option("512,2048", "--context", help="Prompt lengths, comma-separated."),
    batch: str = typer.Option("1,8", "--batch", help="Batch sizes, comma-separated."),
    new_tokens: int = typer.Option(
        32, "--new_tokens", "--new-tokens", help="Decode steps after each prefill."
    ),
    repeats: int = typer.Option(3, "--repeats", help="Timed repeats per variant (medians are reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed warm-up runs per variant and cell."),
    skip_ratio: float | None = typer.Option(
        None,
        "--skip_ratio",
        "--skip-ratio",
        help="Force this share of the routed layers to skip every unit (deepest first), the rest to keep all.",
    ),
    granularity: str | None = typer.Option(
        None,
        "--granularity",
        help=f"For fresh routers: one of {', '.join(GRANULARITIES)} (default attn_sequence).",
    ),
    router_layers: int = typer.Option(
        16,
        "--router_layers",
        "--router-layers",
        "--mod_n",
        help="For fresh routers: how many deep layers get one.",
    ),
    variants: str = typer.Option(
        "dense,all_kept,routed,oracle", "--variants", help="Variants to time (dense and routed are required)."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the full report (JSON) here."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (cuda:N)."),
    dtype: str | None = dtype_option(),
    attn_implementation: str | None = attn_option(),
    threads: int | None = typer.Option(
        None, "--threads", help="torch CPU threads (default: torch's choice)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompts (and random weights)."),
    compile_decode: bool = typer.Option(
        False,
        "--compile",
        help="Time decode under torch.compile with a static cache: dense eager and compiled, routed eager and "
        "compiled, the oracle compiled (--variants does not apply). About a minute of compilation per graph on a CPU.",
    ),
    compile_backend: str = typer.Option(
        "inductor", "--compile_backend", "--compile-backend", help="torch.compile backend for --compile."
    ),
) -> None:
    """Time prefill and decode of the dense model, the routed model, and the model with the skipped
    sub-layers deleted, in one process; report speedups against the FLOP-ideal and KV-cache bytes."""
    from routertune.benchmark import BenchError, BenchSettings, parse_sizes

    try:
        if granularity is not None and granularity not in GRANULARITIES:
            raise BenchError(f"--granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
        settings = BenchSettings(
            contexts=parse_sizes(context, "context"),
            batches=parse_sizes(batch, "batch"),
            new_tokens=new_tokens,
            repeats=repeats,
            warmup=warmup,
            skip_ratio=skip_ratio,
            variants=[v.strip() for v in variants.split(",") if v.strip()],
            seed=seed,
        )
    except BenchError as err:
        fail(str(err))
    if threads is not None and threads < 1:
        fail(f"--threads must be >= 1; got {threads}")

    import torch

    from routertune import RouterConfig, RouterConfigError, RouterLoadError, attach_routers, load_routers
    from routertune.benchmark import load_bench_model, results_table, run_benchmark
    from routertune.io_utils import atomic_write_text
    from routertune.loading import ModelResolutionError
    from routertune.routing.attach import get_router_config

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is visible; use --device cpu")
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        lm, name = load_bench_model(
            model, device=device, dtype=dtype, seed=seed, attn_implementation=attn_implementation
        )
    except (BenchError, ModelResolutionError, ValueError) as err:
        fail(str(err))
    try:
        if routers is not None:
            load_routers(lm, routers)
            loaded = get_router_config(lm).granularity
            if granularity is not None and granularity != loaded:
                fail(f"--granularity {granularity} disagrees with the routers in {routers} ({loaded})")
        else:
            attach_routers(
                lm, RouterConfig(granularity=granularity or "attn_sequence", router_layers=router_layers)
            )
    except (RouterLoadError, RouterConfigError) as err:
        fail(str(err))

    typer.echo(f"bench: {name} on {device}, threads {torch.get_num_threads()}", err=True)
    progress = lambda line: typer.echo(f"bench: {line}", err=True)  # noqa: E731
    try:
        if compile_decode:
            from routertune.benchmark.compiled import compiled_results_table, run_compiled_benchmark

            report = run_compiled_benchmark(lm, settings, name=name, progress=progress, backend=compile_backend)
            report["routers"] = str(routers) if routers is not None else None
        else:
            report = run_benchmark(
                lm,
                settings,
                name=name,
                routers=str(routers) if routers is not None else None,
                progress=progress,
            )
    except (BenchError, RouterConfigError) as err:
        fail(str(err))
    except torch.OutOfMemoryError as err:
        fail(
            f"out of memory on {device} ({err}); try a smaller --context/--batch, a smaller model, or --dtype bf16"
        )
    typer.echo(compiled_results_table(report) if compile_decode else results_table(report))
    if json_path is not None:
        import json

        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
        typer.echo(f"bench: wrote {json_path}", err=True)

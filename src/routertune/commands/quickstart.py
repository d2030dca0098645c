"""``routertune quickstart``: the main job on the embedded defaults."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("quickstart")
    def quickstart(
        model: str = typer.Option(
            None, "--model", help="Model (default: the built-in smollm2-135m-instruct)."
        ),
        output_dir: Path = typer.Option(Path("reports/quickstart"), "--output_dir", help="Report folder."),
        granularity: str = typer.Option("attn_sequence", "--granularity", help="Router granularity."),
        router_layers: int = typer.Option(16, "--router_layers", "--mod_n", help="Routed deepest layers."),
        train_samples: int = typer.Option(256, "--train_samples", help="Builtin examples to train on."),
        max_seq_length: int = typer.Option(256, "--max_seq_length", help="Truncate training examples."),
        learning_rate: float = typer.Option(0.1, "--learning_rate", help="Router learning rate (SGD)."),
        limit: int = typer.Option(40, "--limit", help="Documents per evaluation task."),
        mmlu_limit: int = typer.Option(1, "--mmlu_limit", help="Documents per MMLU subject (57 subjects)."),
        tasks: str = typer.Option(
            "", "--tasks", help="Comma-separated tasks (default: the nine offline tasks)."
        ),
        calibrated_capacities: str = typer.Option(
            "0.75",
            "--calibrated_capacities",
            help="Comma-separated capacities the routers are recalibrated to, each shown beside the "
            "attention drop of the same compute ('' for the trained routers only).",
        ),
        bench_contexts: str = typer.Option(
            "512,2048",
            "--bench_contexts",
            "--bench_context",
            help="Comma-separated benchmark context lengths.",
        ),
        bench_new_tokens: int = typer.Option(32, "--bench_new_tokens", help="Benchmark decode steps."),
        threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    ) -> None:
        """Router-tune the default model on builtin data; evaluate dense, the routed model at its own and
        at calibrated capacities, and the attention drop of each one's compute; benchmark; write a
        report (about 25 minutes on 2 CPU cores with the defaults)."""
        from routertune.quickstart import QuickstartSettings, run_quickstart

        if limit < 1 or mmlu_limit < 1 or train_samples < 1:
            raise typer.BadParameter("--limit, --mmlu_limit and --train_samples must be >= 1")
        try:
            capacities = tuple(float(c) for c in calibrated_capacities.split(",") if c.strip())
            contexts = tuple(int(c) for c in bench_contexts.split(",") if c.strip())
        except ValueError:
            raise typer.BadParameter(
                f"--calibrated_capacities takes numbers and --bench_contexts integers, comma-separated; "
                f"got {calibrated_capacities!r} and {bench_contexts!r}"
            ) from None
        try:
            settings = QuickstartSettings(
                model=model,
                output_dir=str(output_dir),
                granularity=granularity,
                router_layers=router_layers,
                train_samples=train_samples,
                max_seq_length=max_seq_length,
                learning_rate=learning_rate,
                limit=limit,
                mmlu_limit=mmlu_limit,
                tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                calibrated_capacities=capacities,
                bench_contexts=contexts,
                bench_new_tokens=bench_new_tokens,
                threads=threads or None,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        try:
            report = run_quickstart(settings)
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(1) from exc
        typer.echo(str(report))

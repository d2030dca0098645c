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
        bench_context: int = typer.Option(512, "--bench_context", help="Benchmark context length."),
        bench_new_tokens: int = typer.Option(32, "--bench_new_tokens", help="Benchmark decode steps."),
        threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    ) -> None:
        """Router-tune the default model on builtin data, evaluate dense vs routed vs attention drop,
        benchmark, and write a report (about 20 minutes on 2 CPU cores with the defaults)."""
        from routertune.quickstart import QuickstartSettings, run_quickstart

        if limit < 1 or mmlu_limit < 1 or train_samples < 1:
            raise typer.BadParameter("--limit, --mmlu_limit and --train_samples must be >= 1")
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
            bench_context=bench_context,
            bench_new_tokens=bench_new_tokens,
            threads=threads or None,
        )
        try:
            report = run_quickstart(settings)
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(1) from exc
        typer.echo(str(report))

"""``routertune data``: prepare instruction data as the seed project does, plus the offline builtin mix.

    routertune data reformat --raw_data_root ./data/raw --save_path ./data/reformatted
    routertune data mix --reformatted_dir ./data/reformatted --save_path ./data/mixed
    routertune data builtin --save_path ./data/builtin/data.jsonl --n 1000

Each verb ends with a table of counts: kept, dropped by reason, replicated.
"""

from __future__ import annotations

from pathlib import Path

import typer

from routertune.commands.common import fail

data_app = typer.Typer(
    name="data",
    help="Prepare instruction data: reformat raw datasets, mix them, or write the builtin mix.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")



def _split_names(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return names or None


@data_app.command("reformat")
def reformat_command(
    raw_data_root: Path = typer.Option(
        Path("data/raw"), "--raw_data_root", "--raw-data-root", help="Folder holding <dataset>/ raw folders."
    ),
    save_path: Path = typer.Option(
        Path("data/reformatted"), "--save_path", "--save-path", help="Output folder: <dataset>/data.jsonl."
    ),
    datasets: list[str] | None = typer.Option(
        None,
        "--datasets",
        help="Datasets to convert, comma-separated or repeated (default: all six: vicuna_sharegpt, "
        "evol_instruct, slim_orca, meta_math_qa, evol_code_alpaca, alpaca).",
    ),
    skip_unknown_roles: bool = typer.Option(
        False,
        "--skip_unknown_roles",
        "--skip-unknown-roles",
        help="Drop conversations with an unknown sender name instead of stopping with an error.",
    ),
) -> None:
    """Convert the raw datasets into the unified messages jsonl (one folder per dataset)."""
    from rich.console import Console
    from rich.table import Table

    from routertune.data.messages import DataFormatError
    from routertune.data.reformat import reformat_datasets

    try:
        reports = reformat_datasets(
            raw_data_root, save_path, _split_names(datasets), skip_unknown_roles=skip_unknown_roles
        )
    except (DataFormatError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    table = Table(title=f"reformat {raw_data_root} -> {save_path}")
    for column in ("dataset", "records", "kept", "dropped (reason: count)", "output"):
        table.add_column(column)
    for r in reports:
        if not r.found:
            table.add_row(r.dataset, "-", "-", "absent: skipped", "-")
            continue
        dropped = ", ".join(f"{reason}: {count}" for reason, count in sorted(r.dropped.items())) or "0"
        table.add_row(r.dataset, str(r.total), str(r.kept), dropped, r.output or "-")
    Console().print(table)
    if not any(r.found for r in reports):
        fail(f"no raw dataset found under {raw_data_root}")


@data_app.command("mix")
def mix_command(
    reformatted_dir: Path = typer.Option(
        Path("data/reformatted"),
        "--reformatted_dir",
        "--reformatted-dir",
        help="Output folder of `data reformat`.",
    ),
    save_path: Path = typer.Option(
        Path("data/mixed"), "--save_path", "--save-path", help="Output folder: data.jsonl."
    ),
    portions: str | None = typer.Option(
        None,
        "--portions",
        help="name=float,... replacing the seed's table (vicuna_sharegpt=2.9, evol_instruct, slim_orca, "
        "meta_math_qa, evol_code_alpaca = 1.0). 2.5 = two copies plus a random half.",
    ),
    seed: int = typer.Option(233, "--seed", help="Random seed for sampling and shuffling."),
) -> None:
    """Mix reformatted datasets by portions into one shuffled data.jsonl."""
    from rich.console import Console
    from rich.table import Table

    from routertune.data.messages import DataFormatError
    from routertune.data.mix import mix_datasets, parse_portions

    try:
        table_of_portions = parse_portions(portions) if portions is not None else None
        report = mix_datasets(reformatted_dir, save_path, table_of_portions, seed=seed)
    except (DataFormatError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    table = Table(title=f"mix {reformatted_dir} -> {report.output} (seed {report.seed})")
    for column in ("dataset", "portion", "examples", "after portion"):
        table.add_column(column)
    for e in report.entries:
        if not e.found:
            table.add_row(e.dataset, f"{e.portion:g}", "absent: skipped", "0")
        else:
            table.add_row(e.dataset, f"{e.portion:g}", str(e.original), str(e.replicated))
    table.add_row("total", "", "", str(report.total))
    Console().print(table)


@data_app.command("builtin")
def builtin_command(
    save_path: Path = typer.Option(
        Path("data/builtin/data.jsonl"), "--save_path", "--save-path", help="Output jsonl file."
    ),
    n: int | None = typer.Option(None, "--n", min=0, help="Write only the first N examples (default: all)."),
) -> None:
    """Write the builtin instruction mix (packaged, non-evaluation sources) as unified jsonl."""
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    from routertune.data.builtin import BuiltinDataError, builtin_excluded, builtin_messages
    from routertune.data.messages import write_jsonl

    try:
        examples = builtin_messages(n)
        excluded = builtin_excluded()
    except BuiltinDataError as e:
        fail(str(e))
    write_jsonl(save_path, examples)
    counts = Counter(e["dataset"] for e in examples)
    table = Table(title=f"builtin -> {save_path}")
    table.add_column("source task")
    table.add_column("examples")
    table.add_column("left out (contain eval text)")
    for source in sorted(set(counts) | set(excluded)):
        table.add_row(source, str(counts.get(source, 0)), str(excluded.get(source, 0)))
    table.add_row("total", str(len(examples)), str(sum(excluded.values())))
    Console().print(table)

"""``routertune train``: Router-Tuning (routers only, routers + LoRA, or full fine-tuning).

    routertune train --data_type builtin --max_train_samples 1000 --max_seq_length 512 --output_dir runs/rt
    routertune train --help        (every flag: the seed's names plus transformers' TrainingArguments)

The verb forwards its arguments untouched to ``routertune.train.main`` (HfArgumentParser), so
``routertune train ...`` and ``python -m routertune.train ...`` accept exactly the same flags.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,  # --help goes to the training argument parser, which knows every flag
    )(train)


def train(ctx: typer.Context) -> None:
    """Train routers (Router-Tuning) on instruction data; --help lists every flag."""
    from routertune.train import main

    code = main(list(ctx.args))
    if code:
        raise typer.Exit(code=code)

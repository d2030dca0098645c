"""The ``routertune`` command line: one verb per module under ``routertune.commands``.

Each command module defines ``register(app)``; the function it registers is the verb, and
its signature and docstring are the verb's flags and help.
"""

from __future__ import annotations

import importlib
import importlib.util

import typer

app = typer.Typer(
    name="routertune",
    help="Router-Tuning / MindSkip: train tiny routers that make a pretrained LLM skip layers for real.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Router-Tuning / MindSkip: train tiny routers that make a pretrained LLM skip layers for real."""
    # An explicit callback keeps typer in multi-command mode even if only one verb is installed.


# Order is the order shown in --help.
COMMAND_MODULES = (
    "quickstart", "generate", "data", "train", "evaluate", "bench", "calibrate", "drop", "analyze", "serve",
)  # fmt: skip


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        module_name = f"routertune.commands.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()

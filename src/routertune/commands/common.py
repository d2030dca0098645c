"""What the verbs share: the error exit, the options every model-loading verb takes, --limit.

Options are functions returning a fresh ``typer.Option`` so that each verb's signature stays the
one place its flags are read from.
"""

from __future__ import annotations

from typing import Any, NoReturn

import typer

from routertune.loading import DEFAULT_MODEL


def fail(message: str) -> NoReturn:
    """Prints ``Error: message`` on stderr and exits with status 1 (an expected failure)."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code=1)


def model_option(help: str = "Local Hugging Face folder, built-in name, or hub id.") -> Any:
    return typer.Option(DEFAULT_MODEL, "--model", "-m", help=help)


def device_option() -> Any:
    return typer.Option(None, "--device", help="cpu, cuda, cuda:1...; default cuda when available.")


def dtype_option() -> Any:
    return typer.Option(None, "--dtype", help="float32, bf16 or fp16; default float32 on CPU, bf16 on CUDA.")


def attn_option() -> Any:
    return typer.Option(
        None,
        "--attn_implementation",
        "--attn-implementation",
        help="Attention kernel: sdpa (default), eager, flex_attention, flash_attention_2 (CUDA + flash-attn).",
    )


def checked_limit(limit: float | None) -> int | float | None:
    """``--limit`` as lm-eval takes it: a whole number of documents, or a fraction below 1."""
    from routertune.evaluation.errors import EvaluationError
    from routertune.evaluation.run import check_limit

    try:
        check_limit(limit)
    except EvaluationError as err:
        fail(f"--{err}")
    return None if limit is None else (int(limit) if limit >= 1 else float(limit))


def fmt4(value: Any) -> str:
    """A number with four decimals, ``-`` for anything else (tables of results)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

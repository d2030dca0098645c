"""Errors of evaluation requests."""

from __future__ import annotations


class EvaluationError(ValueError):
    """Invalid evaluation arguments."""


class UnknownTaskError(EvaluationError):
    """A requested task is neither an offline task nor found under ``include_path``."""

"""The vocabulary of model resolution: its error, the default model, the cache folder, the result."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelResolutionError(ValueError):
    """A ``--model`` value could not be turned into a loadable model folder."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model lives on disk and what to call it.

    Attributes:
        path: local Hugging Face folder to pass to ``from_pretrained``.
        name: the user-facing name (built-in name, hub id, or the folder's absolute path);
            stamped into ``model.config._name_or_path``.
        kind: ``"local"``, ``"builtin"`` or ``"hub"``.
    """

    path: str
    name: str
    kind: str


def cache_dir() -> Path:
    """routertune's cache folder: ``$ROUTERTUNE_CACHE``, else ``$XDG_CACHE_HOME/routertune``,
    else ``~/.cache/routertune``."""
    explicit = os.environ.get("ROUTERTUNE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "routertune"
    return Path.home() / ".cache" / "routertune"

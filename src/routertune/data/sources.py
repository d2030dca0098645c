"""Resolve what a user names as training data into a list of unified-format examples."""

from __future__ import annotations

from pathlib import Path

from routertune.data.builtin import BUILTIN_NAME, builtin_messages
from routertune.data.messages import load_messages_jsonl


def load_training_examples(source: str | Path, max_samples: int | None = None) -> list[dict]:
    """Loads training examples from ``"builtin"``, a jsonl file, or a folder holding ``data.jsonl``.

    Args:
        source: ``"builtin"`` (the packaged mix), a unified jsonl file, or a folder such as the
            output of ``routertune data mix`` / one dataset folder of ``routertune data reformat``.
        max_samples: keep only the first ``max_samples`` examples (the seed's ``max_train_samples``;
            reformatted and builtin data are already in a fixed shuffled order).

    Raises:
        FileNotFoundError: when the path does not exist or a folder has no ``data.jsonl``.
        DataFormatError: on an invalid line, naming file and line.
    """
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")
    if str(source) == BUILTIN_NAME:
        return builtin_messages(max_samples)
    path = Path(source)
    if path.is_dir():
        path = path / "data.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"training data not found: {source} (expected 'builtin', a .jsonl file, or a folder with data.jsonl)"
        )
    examples = load_messages_jsonl(path)
    return examples if max_samples is None else examples[:max_samples]

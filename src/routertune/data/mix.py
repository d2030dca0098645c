"""Mix reformatted datasets by per-dataset portions into one shuffled training file.

    routertune data mix --reformatted_dir ./data/reformatted --save_path ./data/mixed

As the seed's ``mix_datasets.py``: each dataset's examples are replicated by its portion
(2.5 = two full copies plus a random half, sampled without replacement), datasets are taken in
the portion table's order, and the whole list is shuffled; ``random.Random(seed)`` drives both,
seed 233 by default, so the same inputs give the same file. One deliberate difference: the
fractional count is computed exactly from the portion's decimal value (10 examples at 2.9 give
29), where the seed's float arithmetic gives 28.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

from routertune.data.messages import load_messages_jsonl, write_jsonl

T = TypeVar("T")

# The seed's default mix: alpaca is reformatted but not mixed.
DEFAULT_PORTIONS: dict[str, float] = {
    "vicuna_sharegpt": 2.9,
    "evol_instruct": 1.0,
    "slim_orca": 1.0,
    "meta_math_qa": 1.0,
    "evol_code_alpaca": 1.0,
}
DEFAULT_SEED = 233


def replicated_size(n: int, portion: float) -> int:
    """How many elements :func:`replicate` returns for ``n`` elements at ``portion``."""
    if portion < 0:
        raise ValueError(f"portion must be >= 0, got {portion}")
    exact = Fraction(repr(float(portion)))  # repr is the shortest decimal: 2.9 -> 29/10, not 2.8999...
    return math.floor(n * exact)


def replicate(elements: list[T], portion: float, rng: random.Random) -> list[T]:
    """Replicates ``elements`` by a float multiplier: ``int(portion)`` copies plus a random sample.

    The sample holds ``floor(len(elements) * fractional part)`` distinct elements, computed from the
    portion's decimal value so that 10 elements at 2.9 give exactly 29.
    """
    whole = int(portion)
    extra = replicated_size(len(elements), portion) - whole * len(elements)
    result = list(elements) * whole
    if extra > 0:
        result.extend(rng.sample(elements, extra))
    return result


def parse_portions(text: str) -> dict[str, float]:
    """Parses ``"name=float,name=float"`` into an ordered dict.

    Raises:
        ValueError: on an item without ``=``, a non-number, a negative portion or a repeated name.
    """
    portions: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"bad portion {item!r}: expected name=float, e.g. vicuna_sharegpt=2.9")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"bad portion {item!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"bad portion {item!r}: must be a finite number >= 0")
        if name in portions:
            raise ValueError(f"portion for {name!r} given twice")
        portions[name] = number
    if not portions:
        raise ValueError("no portions given")
    return portions


@dataclass
class MixEntry:
    """One dataset's share of a mix."""

    dataset: str
    portion: float
    files: list[str] = field(default_factory=list)
    original: int = 0
    replicated: int = 0

    @property
    def found(self) -> bool:
        return bool(self.files)


@dataclass
class MixReport:
    entries: list[MixEntry]
    total: int
    seed: int
    output: str

    def as_dict(self) -> dict:
        return {
            "seed": self.seed,
            "total": self.total,
            "output": self.output,
            "datasets": [
                {
                    "dataset": e.dataset,
                    "portion": e.portion,
                    "found": e.found,
                    "files": e.files,
                    "original": e.original,
                    "replicated": e.replicated,
                }
                for e in self.entries
            ],
        }


def mix_examples(
    datasets: Mapping[str, list[list[dict]]], portions: Mapping[str, float], seed: int = DEFAULT_SEED
) -> list[dict]:
    """Mixes in-memory datasets (name -> list of per-file example lists) as the seed does.

    Datasets are visited in ``portions`` order; each file's list is replicated on its own (as the
    seed does per file), then everything is shuffled. Names missing from ``datasets`` are skipped.
    """
    rng = random.Random(seed)
    mixed: list[dict] = []
    for name, portion in portions.items():
        for examples in datasets.get(name, []):
            mixed.extend(replicate(examples, portion, rng))
    rng.shuffle(mixed)
    return mixed


def mix_datasets(
    reformatted_dir: str | Path,
    save_path: str | Path,
    portions: Mapping[str, float] | None = None,
    seed: int = DEFAULT_SEED,
) -> MixReport:
    """Mixes ``<reformatted_dir>/<name>/*.jsonl`` into ``<save_path>/data.jsonl`` (atomically).

    Args:
        reformatted_dir: the output folder of ``reformat``.
        save_path: folder receiving ``data.jsonl``.
        portions: dataset name -> multiplier, in mixing order; replaces the default table
            (:data:`DEFAULT_PORTIONS`, the seed's) when given. A portion of 0 leaves a dataset out.
        seed: the random seed for sampling and shuffling.

    Returns:
        A report; datasets without files are listed with ``found == False`` and contribute nothing.

    Raises:
        FileNotFoundError: when ``reformatted_dir`` is missing or none of the datasets has data.
        DataFormatError: on an invalid line in an input file (naming file and line).
    """
    root = Path(reformatted_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"reformatted data folder not found: {root}")
    portions = dict(DEFAULT_PORTIONS if portions is None else portions)
    for name, portion in portions.items():
        if portion < 0:
            raise ValueError(f"portion for {name!r} must be >= 0, got {portion}")
    entries = []
    loaded: dict[str, list[list[dict]]] = {}
    for name, portion in portions.items():
        entry = MixEntry(dataset=name, portion=portion)
        folder = root / name
        files = sorted(folder.rglob("*.jsonl")) if folder.is_dir() else []
        per_file = [load_messages_jsonl(f) for f in files]
        entry.files = [str(f) for f in files]
        entry.original = sum(len(x) for x in per_file)
        loaded[name] = per_file
        entries.append(entry)
    if not any(e.found for e in entries):
        raise FileNotFoundError(
            f"none of the datasets {list(portions)} has a *.jsonl file under {root} "
            "(run `routertune data reformat` first)"
        )
    for entry in entries:
        entry.replicated = sum(replicated_size(len(x), entry.portion) for x in loaded[entry.dataset])
    mixed = mix_examples(loaded, portions, seed)
    output = Path(save_path) / "data.jsonl"
    write_jsonl(output, mixed)
    return MixReport(entries=entries, total=len(mixed), seed=seed, output=str(output))

"""Reading raw records from the files people download: json, jsonl, parquet, saved HF datasets.

A raw dataset location is a folder (a Hugging Face hub snapshot, a ``save_to_disk`` folder, or
any folder of data files) or a single data file. Records come out one at a time with a
human-readable location, so that every later error can name the file and the record.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from routertune.data.messages import DataFormatError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
# Like `datasets.load_dataset(folder)["train"]`, which the seed used: files named for another
# split are not training data.
_METADATA_FILES = frozenset({"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"})
_NON_TRAIN_SPLIT = re.compile(r"(^|[^a-z0-9])(test|testing|eval|valid|validation|dev)([^a-z0-9]|$)")


@dataclass(frozen=True)
class RawSource:
    """Where the records of one raw dataset come from.

    Attributes:
        kind: ``"files"`` or ``"saved_dataset"``.
        paths: the data files in reading order (for ``"files"``) or the saved dataset folder.
    """

    kind: str
    paths: tuple[Path, ...]

    def describe(self) -> list[str]:
        return [str(p) for p in self.paths]


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _is_data_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(DATA_SUFFIXES)


def find_raw_source(path: str | Path, preferred_files: Sequence[str] = ()) -> RawSource | None:
    """Finds the data of one raw dataset, or ``None`` when there is none.

    Args:
        path: a data file, a saved dataset folder, or a folder searched recursively for data files
            (hidden folders such as ``.cache`` are skipped; files named for a test/validation split
            are left out unless nothing else is there).
        preferred_files: file names that, when present anywhere under ``path``, are read alone
            (the first one found in this order wins), e.g. the seed's ShareGPT file.
    """
    path = Path(path)
    if _is_data_file(path):
        return RawSource("files", (path,))
    if not path.is_dir():
        return None
    if is_saved_dataset(path):
        return RawSource("saved_dataset", (path,))
    visible = [
        p
        for p in sorted(path.rglob("*"))
        if not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    saved = [p for p in visible if is_saved_dataset(p)]
    saved = [p for p in saved if not any(q in p.parents for q in saved)]  # top-most only
    if saved:
        # A save_to_disk folder one or more levels down (its json files are metadata, not records).
        train = [p for p in saved if not _is_non_train(p, path)] or saved
        if len(train) > 1:
            raise DataFormatError(f"{path}: several saved datasets ({[str(p) for p in train]}); point at one")
        return RawSource("saved_dataset", (train[0],))
    files = [p for p in visible if _is_data_file(p) and p.name not in _METADATA_FILES]
    for name in preferred_files:
        matches = [p for p in files if p.name == name]
        if matches:
            return RawSource("files", (matches[0],))
    files = [p for p in files if not _is_non_train(p, path)] or files
    return RawSource("files", tuple(files)) if files else None


def _is_non_train(p: Path, root: Path) -> bool:
    return bool(_NON_TRAIN_SPLIT.search(p.relative_to(root).as_posix().lower()))


def iter_raw_records(source: RawSource) -> Iterator[tuple[str, Any]]:
    """Yields ``(location, record)`` for every record of a raw source, in a fixed order.

    Locations read like ``"data.jsonl line 12"``, ``"data.json record 3"``, ``"x.parquet row 5"``.

    Raises:
        DataFormatError: on malformed json (naming file and line) or an unexpected top-level shape.
    """
    if source.kind == "saved_dataset":
        yield from _iter_saved_dataset(source.paths[0])
        return
    for path in source.paths:
        name = path.name.lower()
        if name.endswith(".parquet"):
            yield from _iter_parquet(path)
        elif name.endswith((".jsonl", ".jsonl.gz")):
            yield from _iter_json_lines(path)
        else:
            yield from _iter_json(path)


def _open_text(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _iter_json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                yield f"{path} line {line_number}", _loads_line(line, path, line_number)


def _loads_line(line: str, path: Path, line_number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path} line {line_number}: malformed json ({e.msg})") from None


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    """A ``.json`` file: one array of records, or json lines."""
    with _open_text(path) as f:
        text = f.read()
    stripped = text.lstrip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if stripped.startswith("{"):
            # Several objects, one per line: a jsonl file with a .json name (common on the hub).
            for line_number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    yield f"{path} line {line_number}", _loads_line(line, path, line_number)
            return
        raise DataFormatError(f"{path} line {e.lineno} column {e.colno}: malformed json ({e.msg})") from None
    if isinstance(data, dict):
        # A lone object is one record (a one-line jsonl file named .json).
        yield f"{path} record 0", data
        return
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a json list of records, got {type(data).__name__}")
    for index, record in enumerate(data):
        yield f"{path} record {index}", record


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{path} row {row}", record
            row += 1


def _iter_saved_dataset(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise DataFormatError(f"{path}: saved dataset has splits {splits} and none is named 'train'")
        dataset, where = loaded[split], f"{path} (split {split})"
    else:
        dataset, where = loaded, str(path)
    for index, record in enumerate(dataset):
        yield f"{where} row {index}", record

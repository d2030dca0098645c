"""Convert the seed project's six raw instruction datasets into the unified messages jsonl.

    routertune data reformat --raw_data_root ./data/raw --save_path ./data/reformatted

``<raw_data_root>/<key>/`` holds one raw dataset as downloaded (hub snapshot folder, data files
or a ``save_to_disk`` folder); ``<save_path>/<key>/data.jsonl`` receives its examples. Keys,
``dataset`` names, ids (``<name>_<record index>``) and sender mappings follow the seed's
``reformat_datasets.py``:

- ``vicuna_sharegpt`` -> ``ShareGPT_Vicuna_unfiltered``: ``conversations`` of ``{from, value}``;
  senders human/user, gpt/chatgpt/bard, system; a "bing" turn drops the conversation.
- ``evol_instruct`` -> ``WizardLM_evol_instruct_V2_143k``: same schema; senders human/user,
  gpt/chatgpt; a "system" or "bing" turn drops the conversation.
- ``slim_orca`` -> ``SlimOrca``: same schema; senders system, human/user, gpt/chatgpt.
- ``meta_math_qa`` -> ``MetaMathQA``: ``query`` / ``response``.
- ``evol_code_alpaca`` -> ``evol_codealpaca_v1``: ``instruction`` / ``output``.
- ``alpaca`` -> ``alpaca``: ``instruction`` / ``input`` / ``output``; the user turn is the
  instruction, plus ``"\\nInput: <input>\\n"`` when the input is not empty.

Beyond the seed, an empty system turn is left out, and conversations that no chat template can
train on are dropped and counted by reason (see :func:`routertune.data.messages.conversation_problem`). A sender name outside the
table is an error naming the file and record, unless ``skip_unknown_roles`` drops those
conversations instead. A missing raw folder is reported and skipped.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routertune.data.messages import DataFormatError, conversation_problem
from routertune.data.readers import find_raw_source, iter_raw_records
from routertune.io_utils import atomic_path


class UnknownSenderError(DataFormatError):
    """A conversation turn whose sender name is not in the dataset's sender table."""


class _Drop(Exception):
    """Raised by a converter for an example that is skipped, with the reason that is counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Converter = Callable[[dict, str, bool], list[dict]]


def _field(record: Any, name: str, where: str, *, optional: bool = False) -> Any:
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a json object, got {type(record).__name__}")
    if name not in record:
        if optional:
            return None
        raise DataFormatError(f"{where}: missing field {name!r} (fields: {sorted(record)[:12]})")
    return record[name]


def _text_field(record: dict, name: str, where: str, *, optional: bool = False) -> str:
    value = _field(record, name, where, optional=optional)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _conversation_converter(roles: Mapping[str, str], drops: Mapping[str, str]) -> Converter:
    """A converter for ShareGPT-style ``conversations`` lists of ``{"from", "value"}`` turns.

    Args:
        roles: sender name -> unified role.
        drops: sender name -> drop reason; a turn from such a sender drops the whole conversation.
    """

    def convert(record: dict, where: str, skip_unknown_roles: bool) -> list[dict]:
        turns = _field(record, "conversations", where)
        if not isinstance(turns, list):
            raise DataFormatError(
                f"{where}: field 'conversations' must be a list, got {type(turns).__name__}"
            )
        messages = []
        for i, turn in enumerate(turns):
            turn_where = f"{where} conversations[{i}]"
            sender = _field(turn, "from", turn_where)
            if sender in drops:
                raise _Drop(drops[sender])
            if sender not in roles:
                if skip_unknown_roles:
                    raise _Drop(f"unknown sender {sender!r}")
                raise UnknownSenderError(
                    f"{turn_where}: unknown message sender {sender!r} (known: {sorted(roles)}; "
                    f"dropped: {sorted(drops)}); pass --skip_unknown_roles to drop such conversations"
                )
            content = _text_field(turn, "value", turn_where)
            if roles[sender] == "system" and not content.strip():
                continue  # an empty system prompt (common in SlimOrca) says nothing: leave it out
            messages.append({"role": roles[sender], "content": content})
        return messages

    return convert


def _pair_converter(prompt_field: str, answer_field: str) -> Converter:
    def convert(record: dict, where: str, skip_unknown_roles: bool) -> list[dict]:
        return [
            {"role": "user", "content": _text_field(record, prompt_field, where)},
            {"role": "assistant", "content": _text_field(record, answer_field, where)},
        ]

    return convert


def _convert_alpaca(record: dict, where: str, skip_unknown_roles: bool) -> list[dict]:
    instruction = _text_field(record, "instruction", where)
    extra = _text_field(record, "input", where, optional=True)
    # The seed's exact layout, trailing newline included.
    user = instruction + (f"\nInput: {extra}\n" if extra != "" else "")
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text_field(record, "output", where)},
    ]


@dataclass(frozen=True)
class RawDataset:
    """One of the seed's raw datasets.

    Attributes:
        key: the raw and reformatted folder name (``vicuna_sharegpt``).
        name: the ``dataset`` field and id prefix written to each example (the seed's names).
        convert: ``(record, location, skip_unknown_roles) -> messages``.
        preferred_files: files read alone when present (the seed's exact file choice).
    """

    key: str
    name: str
    convert: Converter
    preferred_files: tuple[str, ...] = ()


_USER = {"human": "user", "user": "user"}
RAW_DATASETS: dict[str, RawDataset] = {
    d.key: d
    for d in (
        RawDataset(
            "vicuna_sharegpt",
            "ShareGPT_Vicuna_unfiltered",
            _conversation_converter(
                {
                    **_USER,
                    "gpt": "assistant",
                    "chatgpt": "assistant",
                    "bard": "assistant",
                    "system": "system",
                },
                {"bing": "bing turn"},
            ),
            (
                "ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json",
                "ShareGPT_V3_unfiltered_cleaned_split.json",
            ),
        ),
        RawDataset(
            "evol_instruct",
            "WizardLM_evol_instruct_V2_143k",
            _conversation_converter(
                {**_USER, "gpt": "assistant", "chatgpt": "assistant"},
                {"system": "system turn", "bing": "bing turn"},
            ),
        ),
        RawDataset(
            "slim_orca",
            "SlimOrca",
            _conversation_converter(
                {**_USER, "gpt": "assistant", "chatgpt": "assistant", "system": "system"}, {}
            ),
        ),
        RawDataset("meta_math_qa", "MetaMathQA", _pair_converter("query", "response")),
        RawDataset("evol_code_alpaca", "evol_codealpaca_v1", _pair_converter("instruction", "output")),
        RawDataset("alpaca", "alpaca", _convert_alpaca),
    )
}


@dataclass
class ReformatReport:
    """What happened to one raw dataset."""

    dataset: str
    name: str
    found: bool
    files: list[str] = field(default_factory=list)
    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    output: str | None = None

    def as_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "name": self.name,
            "found": self.found,
            "files": self.files,
            "total": self.total,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "output": self.output,
        }


def reformat_dataset(
    raw_path: str | Path, save_dir: str | Path, dataset: str, *, skip_unknown_roles: bool = False
) -> ReformatReport:
    """Converts one raw dataset into ``<save_dir>/data.jsonl`` (written atomically).

    Args:
        raw_path: the raw dataset folder (or file).
        save_dir: the output folder for this dataset.
        dataset: a key of :data:`RAW_DATASETS`.
        skip_unknown_roles: drop conversations with an unknown sender instead of raising.

    Raises:
        UnknownSenderError: on an unknown sender name, naming file and record.
        DataFormatError: on malformed input, naming file and line/record and field.
    """
    spec = RAW_DATASETS[dataset]
    source = find_raw_source(raw_path, spec.preferred_files)
    report = ReformatReport(dataset=dataset, name=spec.name, found=source is not None)
    if source is None:
        return report
    report.files = source.describe()
    output = Path(save_dir) / "data.jsonl"
    with atomic_path(output) as tmp, tmp.open("w", encoding="utf-8") as out:
        for index, (where, record) in enumerate(iter_raw_records(source)):
            report.total += 1
            try:
                messages = spec.convert(record, where, skip_unknown_roles)
            except _Drop as drop:
                report.dropped[drop.reason] += 1
                continue
            problem = conversation_problem(messages)
            if problem is not None:
                report.dropped[problem] += 1
                continue
            example = {"dataset": spec.name, "id": f"{spec.name}_{index}", "messages": messages}
            out.write(json.dumps(example, ensure_ascii=False) + "\n")
            report.kept += 1
    report.output = str(output)
    return report


def reformat_datasets(
    raw_data_root: str | Path,
    save_path: str | Path,
    datasets: Sequence[str] | None = None,
    *,
    skip_unknown_roles: bool = False,
) -> list[ReformatReport]:
    """Converts every requested raw dataset found under ``raw_data_root``.

    Args:
        raw_data_root: folder holding ``<key>/`` raw folders (or ``<key>.jsonl``-like files).
        save_path: folder receiving ``<key>/data.jsonl``.
        datasets: keys to convert (default: all six, in the seed's order).
        skip_unknown_roles: see :func:`reformat_dataset`.

    Returns:
        One report per requested dataset; absent ones have ``found=False`` and write nothing.

    Raises:
        ValueError: for a dataset key that is not one of :data:`RAW_DATASETS`.
        FileNotFoundError: when ``raw_data_root`` is not a folder.
    """
    root = Path(raw_data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"raw data root is not a folder: {root}")
    keys = list(datasets) if datasets else list(RAW_DATASETS)
    unknown = [k for k in keys if k not in RAW_DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; known: {list(RAW_DATASETS)}")
    reports = []
    for key in keys:
        raw = root / key
        if not raw.exists():
            # Also accept a single file such as <root>/alpaca.jsonl.
            raw = next((p for p in sorted(root.glob(f"{key}.*")) if p.is_file()), raw)
        reports.append(
            reformat_dataset(raw, Path(save_path) / key, key, skip_unknown_roles=skip_unknown_roles)
        )
    return reports

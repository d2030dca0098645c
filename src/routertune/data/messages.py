"""The unified messages format shared by every data tool, with its reader, writer and checks.

One example per jsonl line, as the seed project writes it::

    {"dataset": "alpaca", "id": "alpaca_0",
     "messages": [{"role": "system", "content": "..."},      # optional
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from routertune.io_utils import atomic_path

ROLES = ("system", "user", "assistant")


class DataFormatError(ValueError):
    """Input data that cannot be read as the expected schema; the message names file and line/record."""


def validate_example(obj: Any, where: str) -> dict:
    """Checks one training example (unified ``messages``, or the seed's ``prompt``/``completion``).

    Args:
        obj: the parsed json value of one line.
        where: a human-readable location (``"file.jsonl line 3"``) used in error messages.

    Raises:
        DataFormatError: when ``messages`` is missing or empty, a message has a bad role/content,
            or a prompt/completion example lacks one of its two strings.
    """
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a json object, got {type(obj).__name__}")
    messages = obj.get("messages")
    if messages is None and ("prompt" in obj or "completion" in obj):
        return _validate_prompt_completion(obj, where)
    if messages is None:
        raise DataFormatError(f"{where}: missing field 'messages' (or 'prompt' and 'completion')")
    if not isinstance(messages, list):
        raise DataFormatError(f"{where}: field 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise DataFormatError(f"{where}: field 'messages' is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataFormatError(f"{where}: messages[{i}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise DataFormatError(
                f"{where}: messages[{i}] has unknown role {role!r} (expected one of {ROLES})"
            )
        if not isinstance(message.get("content"), str):
            raise DataFormatError(f"{where}: messages[{i}] field 'content' must be a string")
    return obj


def _validate_prompt_completion(obj: dict, where: str) -> dict:
    """The seed's other training format: a plain ``prompt`` and the ``completion`` learnt from it."""
    for name in ("prompt", "completion"):
        if name not in obj:
            raise DataFormatError(f"{where}: has 'prompt' or 'completion' but not field {name!r}")
        if not isinstance(obj[name], str):
            raise DataFormatError(f"{where}: field {name!r} must be a string, got {type(obj[name]).__name__}")
    if not obj["completion"].strip():
        raise DataFormatError(f"{where}: field 'completion' is empty (nothing to learn from)")
    return obj


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yields ``(line_number, parsed_value)`` for each non-blank line; line numbers start at 1.

    Raises:
        DataFormatError: on a malformed line, naming the file and the line number.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path} line {line_number}: malformed json ({e.msg})") from None


def iter_messages_jsonl(path: str | Path) -> Iterator[dict]:
    """Yields validated unified-format examples from a jsonl file (see :func:`load_messages_jsonl`)."""
    for line_number, obj in iter_jsonl(path):
        yield validate_example(obj, f"{path} line {line_number}")


def load_messages_jsonl(path: str | Path) -> list[dict]:
    """Reads a unified messages jsonl file, validating every line.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        DataFormatError: on malformed json, a missing or empty ``messages`` field, or an unknown role,
            naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    return list(iter_messages_jsonl(path))


def write_jsonl(path: str | Path, examples: Iterable[dict]) -> int:
    """Writes one json object per line, atomically. Returns the number of lines written."""
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")
            count += 1
    return count


def conversation_problem(messages: list[dict]) -> str | None:
    """Why a conversation is unfit for training, or ``None`` when it is fine.

    The rules: not empty; an optional system turn only at the start; then a user turn first;
    user and assistant alternate (several chat templates reject anything else); every turn has
    text; at least one assistant turn (otherwise nothing would be learned from it).
    """
    if not messages:
        return "empty conversation"
    if any(not m["content"].strip() for m in messages):
        return "empty turn"
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        return "system turn not first"
    if not body or body[0]["role"] != "user":
        return "does not start with a user turn"
    if any(a["role"] == b["role"] for a, b in zip(body, body[1:], strict=False)):
        return "roles do not alternate"
    if not any(m["role"] == "assistant" for m in body):
        return "no assistant turn"
    return None

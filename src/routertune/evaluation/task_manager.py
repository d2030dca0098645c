"""Which tasks exist: an lm-eval TaskManager over the offline tasks, and name resolution."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routertune.evaluation.errors import EvaluationError, UnknownTaskError
from routertune.tasks import (
    DEFAULT_TASKS,
    MMLU_CATEGORIES,
    MMLU_SUBJECTS,
    TASK_PREFIX,
    TASKS_DIR,
    lm_eval_name,
    user_name,
)


class _QuietExpectedNotices(logging.Filter):
    """Drops lm-eval notices about things routertune does on purpose: tasks with a custom
    dataset loader (one "--metadata" hint per task) and passing a model object to HFLM."""

    _EXPECTED = (
        "Custom kwargs can be passed",
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(text in message for text in self._EXPECTED)


_NOTICE_FILTER = _QuietExpectedNotices()


def _quiet_expected_notices() -> None:
    for name in ("lm_eval.api.task", "lm_eval.models.huggingface"):
        logger = logging.getLogger(name)
        if _NOTICE_FILTER not in logger.filters:
            logger.addFilter(_NOTICE_FILTER)


def build_task_manager(
    include_path: str | Path | Sequence[str | Path] | None = None, include_defaults: bool = False
):
    """An lm-eval TaskManager over the offline tasks (+ ``include_path`` folders).

    Args:
        include_path: extra folder(s) of task YAMLs, searched after the offline tasks.
        include_defaults: also index lm-eval's built-in tasks (they download from the hub, so
            they only work online or with a warm Hugging Face cache; indexing takes seconds).

    Raises:
        EvaluationError: an ``include_path`` folder does not exist.
    """
    from lm_eval.tasks import TaskManager

    extra = (
        []
        if include_path is None
        else [include_path]
        if isinstance(include_path, (str, Path))
        else list(include_path)
    )
    for folder in extra:
        if not Path(folder).is_dir():
            raise EvaluationError(f"include_path {folder} is not a folder")
    _quiet_expected_notices()
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)], include_defaults=include_defaults)


def resolve_tasks(tasks: str | Sequence[str], task_manager: Any) -> dict[str, str]:
    """Maps each requested name to the name lm-eval knows it by, in request order.

    ``arc_easy`` -> ``routertune_arc_easy``; names only found under an ``include_path`` (or
    among lm-eval's built-ins, when indexed) are used as they are. A comma-separated string
    is split.

    Raises:
        UnknownTaskError: a name is unknown; the message lists the available names.
        EvaluationError: no task, or a task requested twice.
    """
    names = (
        [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    )
    names = [n for n in names if n]
    if not names:
        raise EvaluationError("no task given")
    known = set(task_manager.all_tasks)
    resolved: dict[str, str] = {}
    unknown = []
    for name in names:
        offline = lm_eval_name(name)
        if offline in known:
            key, target = user_name(offline), offline
        elif name in known:
            key, target = name, name
        else:
            unknown.append(name)
            continue
        if key in resolved:
            raise EvaluationError(f"task {key} is requested twice")
        resolved[key] = target
    if unknown:
        raise UnknownTaskError(_unknown_message(unknown, known))
    return resolved


def _unknown_message(unknown: list[str], known: set[str]) -> str:
    categories = ", ".join(f"mmlu_{c}" for c in MMLU_CATEGORIES)
    subjects = [f"mmlu_{s}" for s in MMLU_SUBJECTS]
    extra = sorted(n for n in known if not n.startswith(TASK_PREFIX))
    lines = [
        f"unknown task(s): {', '.join(unknown)}",
        f"offline tasks: {', '.join(DEFAULT_TASKS)}",
        f"  MMLU categories: {categories}",
        f"  MMLU subjects: {', '.join(subjects[:4])}, ... ({len(subjects)} in all)",
    ]
    if extra:
        shown = ", ".join(extra[:30]) + (f", ... ({len(extra)} in all)" if len(extra) > 30 else "")
        lines.append(f"from include_path: {shown}")
    return "\n".join(lines)

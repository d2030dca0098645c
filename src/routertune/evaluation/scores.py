"""Scores from lm-eval results: per-task metrics, averages, paired differences between models."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from routertune.evaluation.errors import EvaluationError
from routertune.tasks import primary_metric, user_name

METRICS = ("acc", "acc_norm")


def _number(value: Any) -> float | None:
    """A finite float, or None for lm-eval's "N/A" and NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _metrics(result: dict[str, Any]) -> dict[str, float | None]:
    """acc / acc_norm and their stderrs from one lm-eval result entry (filter "none")."""
    out: dict[str, float | None] = {}
    for metric in METRICS:
        if f"{metric},none" in result:
            out[metric] = _number(result[f"{metric},none"])
            out[f"{metric}_stderr"] = _number(result.get(f"{metric}_stderr,none"))
    return out


def task_summary(out: dict[str, Any], target: str) -> dict[str, Any]:
    """One task's (or group's) metrics, sample count and, for groups, its members' metrics."""
    results = out["results"]
    n_samples = out.get("n-samples", {})
    entry: dict[str, Any] = _metrics(results[target])
    # The run holds this task only, so its documents are all the leaf tasks' documents.
    entry["samples"] = int(sum(v.get("effective", 0) for v in n_samples.values()))
    children = out.get("group_subtasks", {})

    def samples(name: str) -> int:
        if name in n_samples:
            return int(n_samples[name].get("effective", 0))
        return sum(samples(child) for child in children.get(name, []))

    members = {
        user_name(name): {**_metrics(res), "samples": samples(name)}
        for name, res in results.items()
        if name != target
    }
    if members:
        entry["subtasks"] = dict(sorted(members.items()))
    return entry


def per_doc_scores(samples: Mapping[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """0/1 scores of every logged document, ordered by (subtask, doc_id), per metric."""
    scores: dict[str, list[float]] = {}
    for task in sorted(samples):
        for sample in sorted(samples[task], key=lambda s: s["doc_id"]):
            for metric in METRICS:
                if metric in sample:
                    scores.setdefault(metric, []).append(float(sample[metric]))
    return scores


def per_doc_choices(samples: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every logged document's answer choices, ordered as :func:`per_doc_scores`: its subtask,
    ``doc_id``, each choice's log-likelihood (lm-eval's ``resps``), the length of each
    continuation in characters (what ``acc_norm`` divides by) and a short hash of each choice's
    context (:func:`context_key`; most tasks share one context between choices, WinoGrande
    does not), by which a request is traced back to its document."""
    docs = []
    for task in sorted(samples):
        for sample in sorted(samples[task], key=lambda s: s["doc_id"]):
            arguments = [tuple(a) for a in sample["arguments"]]
            docs.append(
                {
                    "task": task,
                    "doc_id": sample["doc_id"],
                    "logliks": [float(r[0][0]) for r in sample["resps"]],
                    "lengths": [len(a[1]) for a in arguments],
                    "contexts": [context_key(a[0]) for a in arguments],
                }
            )
    return docs


def context_key(context: str) -> str:
    """A short stable key of a request's context string (16 hex digits of its SHA-1)."""
    import hashlib

    return hashlib.sha1(context.encode()).hexdigest()[:16]


def paired_difference(
    first: dict[str, Any], second: dict[str, Any], tasks: Sequence[str] | None = None
) -> dict[str, Any]:
    """``second - first`` in average accuracy, with a paired standard error.

    Both arguments are :func:`evaluate` results made with ``per_doc=True`` on the same
    documents. Each task contributes its primary metric (:func:`routertune.tasks.primary_metric`); the average's
    difference is the mean of the per-task differences, and its standard error comes from the
    per-document differences (documents both models get right or wrong add no variance), so it
    is far smaller than the two accuracies' own standard errors.

    Returns:
        ``{"difference", "stderr", "tasks": {name: {"difference", "stderr", "documents",
        "disagreements"}}}`` in accuracy units (0-1).

    Raises:
        EvaluationError: a task missing from either result, without per-document scores, or
            evaluated on a different number of documents.
    """
    names = list(tasks) if tasks is not None else list(first["tasks"])
    per_task: dict[str, dict[str, Any]] = {}
    variance_sum = 0.0
    for name in names:
        a, b = first["tasks"].get(name), second["tasks"].get(name)
        if a is None or b is None or "per_doc" not in a or "per_doc" not in b:
            raise EvaluationError(f"task {name!r} lacks per-document scores in one of the results (per_doc=True)")
        metric = primary_metric(name, a["per_doc"])
        xa, xb = a["per_doc"].get(metric), b["per_doc"].get(metric)
        if xa is None or xb is None or len(xa) != len(xb) or not xa:
            raise EvaluationError(
                f"task {name!r}: the two results scored different documents ({metric}: "
                f"{len(xa or [])} vs {len(xb or [])}); evaluate both with the same tasks and limits"
            )
        diffs = [y - x for x, y in zip(xa, xb, strict=True)]
        n = len(diffs)
        mean = sum(diffs) / n
        var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
        variance_sum += var / n
        per_task[name] = {
            "metric": metric,
            "difference": mean,
            "stderr": math.sqrt(var / n),
            "documents": n,
            "disagreements": sum(1 for d in diffs if d != 0),
        }
    k = len(per_task)
    return {
        "difference": sum(t["difference"] for t in per_task.values()) / k if k else None,
        "stderr": math.sqrt(variance_sum) / k if k else None,
        "tasks": per_task,
    }


def average(per_task: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Mean of each task's primary metric (:func:`routertune.tasks.primary_metric`) and of acc."""
    chosen: dict[str, str] = {}
    for name in names:
        entry = per_task[name]
        metric = primary_metric(name, entry)
        if entry.get(metric) is not None:
            chosen[name] = metric
    accs = [per_task[n]["acc"] for n in names if per_task[n].get("acc") is not None]
    return {
        "value": sum(per_task[n][m] for n, m in chosen.items()) / len(chosen) if chosen else None,
        "acc": sum(accs) / len(accs) if accs else None,
        "metric_per_task": chosen,
    }

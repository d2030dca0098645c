"""Evaluate a (routed) model object with lm-eval on the offline tasks; report capacity used.

    from routertune.evaluation import evaluate
    results = evaluate(model, tokenizer, ["arc_easy", "piqa"], limit=100)
    results["tasks"]["piqa"]["acc"], results["average"]["value"], results["capacity"]["overall"]

The model object itself is evaluated (never a re-loaded copy), in eval mode, so routed layers
really skip what their routers skip. Task names are lm-eval's (``arc_easy``, ``mmlu``, ...);
see :mod:`routertune.tasks` for how they map to the offline task YAMLs.

``run``           ``evaluate``: one lm-eval run per task on the model object, capacity per task
``harness``       ``MaskedHFLM``: lm-eval's HFLM with the padding and routing masks (imports lm-eval)
``task_manager``  the offline tasks as an lm-eval TaskManager; task-name resolution
``scores``        per-task metrics, averages, paired differences between two evaluated models
``errors``        ``EvaluationError``, ``UnknownTaskError``
"""

from routertune.evaluation.errors import EvaluationError, UnknownTaskError
from routertune.evaluation.run import evaluate
from routertune.evaluation.scores import paired_difference
from routertune.evaluation.task_manager import build_task_manager, resolve_tasks
from routertune.tasks import DEFAULT_TASKS

__all__ = [
    "DEFAULT_TASKS",
    "EvaluationError",
    "UnknownTaskError",
    "build_task_manager",
    "evaluate",
    "paired_difference",
    "resolve_tasks",
]

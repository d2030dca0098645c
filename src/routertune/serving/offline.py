"""The routed model through vLLM's offline ``LLM`` API.

    from routertune.serving.offline import routed_llm, routes_of, sampling_params
    llm = routed_llm("served/my-model", max_model_len=2048)
    outs = llm.generate(prompts, sampling_params(max_tokens=64))
    outs += llm.generate(prompts, sampling_params(max_tokens=64, dense=True))
    routes_of(llm, outs)   # request id -> {"routed_layers": [...], "skipped_layers": [...]}

``routed_llm`` adds what a routed engine needs (the worker class; no prefix caching, no chunked
prefill) and refuses arguments that contradict it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from routertune.serving.extra_args import DENSE_KEY, THRESHOLD_KEY, parse_request_routing
from routertune.serving.folder import ServingError

WORKER_CLS = "routertune.serving.vllm_worker.RoutedWorker"
MIDDLEWARE = "routertune.serving.middleware.routes_middleware"

# Engine settings a routed engine needs: the route is decided on the whole prompt (no chunked
# prefill) and a request's KV exists only in the layers it keeps (no prefix sharing).
REQUIRED_ENGINE_ARGS: dict[str, Any] = {
    "worker_cls": WORKER_CLS,
    "enable_prefix_caching": False,
    "enable_chunked_prefill": False,
}


def engine_kwargs(**kwargs: Any) -> dict[str, Any]:
    for key, value in REQUIRED_ENGINE_ARGS.items():
        if key in kwargs and kwargs[key] != value:
            raise ServingError(f"a routed engine needs {key}={value!r}; got {kwargs[key]!r}")
    merged = {**kwargs, **REQUIRED_ENGINE_ARGS}
    # Without chunked prefill a prompt must fit one step.
    if "max_model_len" in merged and "max_num_batched_tokens" not in merged:
        merged["max_num_batched_tokens"] = merged["max_model_len"]
    return merged


def routed_llm(served_folder: str, **kwargs: Any) -> Any:
    from vllm import LLM

    return LLM(model=str(served_folder), **engine_kwargs(**kwargs))


def sampling_params(dense: bool = False, threshold: float | None = None, **kwargs: Any) -> Any:
    """vLLM ``SamplingParams`` with routertune's per-request controls (checked here)."""
    from vllm import SamplingParams

    extra = dict(kwargs.pop("extra_args", None) or {})
    if dense:
        extra[DENSE_KEY] = True
    if threshold is not None:
        extra[THRESHOLD_KEY] = threshold
    parse_request_routing(extra)
    return SamplingParams(extra_args=extra or None, **kwargs)


def routes_of(llm: Any, outputs: Iterable[Any]) -> dict[str, Any]:
    """Each output's routed and skipped layers, asked from the engine's workers."""
    ids = [o.request_id for o in outputs]
    return llm.collective_rpc("routertune_routes", args=(ids,))[0]

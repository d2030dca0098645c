"""Per-request routing controls, carried in vLLM's ``SamplingParams.extra_args``.

    SamplingParams(max_tokens=64, extra_args={"routertune_dense": True})       # no skipping
    SamplingParams(max_tokens=64, extra_args={"routertune_threshold": 0.7})    # skip more

Through the OpenAI server the same keys travel in ``vllm_xargs``
(``{"vllm_xargs": {"routertune_dense": 1}}``). Flat scalar keys, because ``vllm_xargs`` carries
only scalars. ``routertune_threshold`` replaces every routed layer's threshold for that request
(keep a layer iff ``sigmoid(score) - threshold >= 0``, the rule of the router files).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DENSE_KEY = "routertune_dense"
THRESHOLD_KEY = "routertune_threshold"
KNOWN_KEYS = (DENSE_KEY, THRESHOLD_KEY)


class RequestArgumentError(ValueError):
    """A request's routertune arguments are malformed."""


@dataclass(frozen=True)
class RequestRouting:
    dense: bool = False
    threshold: float | None = None


def parse_request_routing(extra_args: Mapping[str, Any] | None) -> RequestRouting:
    """Reads the routertune keys of a request's extra arguments (other keys are left alone).

    Raises:
        RequestArgumentError: an unknown ``routertune_*`` key, a dense flag that is not a boolean
            (or 0/1), or a threshold that is not a finite number >= 0.
    """
    if not extra_args:
        return RequestRouting()
    unknown = sorted(k for k in extra_args if k.startswith("routertune_") and k not in KNOWN_KEYS)
    if unknown:
        raise RequestArgumentError(
            f"unknown routertune argument(s) {unknown}; known: {', '.join(KNOWN_KEYS)}"
        )
    dense = extra_args.get(DENSE_KEY, False)
    if isinstance(dense, str) and dense.lower() in ("true", "false", "1", "0"):
        dense = dense.lower() in ("true", "1")
    if dense not in (True, False, 0, 1):
        raise RequestArgumentError(f"{DENSE_KEY} must be true or false; got {dense!r}")
    threshold = extra_args.get(THRESHOLD_KEY)
    if threshold is not None:
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise RequestArgumentError(f"{THRESHOLD_KEY} must be a number; got {threshold!r}") from None
        if not math.isfinite(threshold) or threshold < 0:
            raise RequestArgumentError(f"{THRESHOLD_KEY} must be a finite number >= 0; got {threshold}")
    return RequestRouting(dense=bool(dense), threshold=threshold)

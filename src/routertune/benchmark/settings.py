"""What a benchmark times: its settings, their checks, and the report's fixed vocabulary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SCHEMA = "routertune.bench/1"
VARIANTS = ("dense", "all_kept", "routed", "oracle")
PREFILL_METHOD = "one forward over `context` random token ids into a fresh DynamicCache, logits_to_keep=1"
DECODE_METHOD = "plain loop of `new_tokens` greedy single-token forwards (argmax on device) on the prefill cache"


class BenchError(ValueError):
    """A benchmark argument or model name is invalid."""


@dataclass
class BenchSettings:
    """What to time. ``skip_ratio`` None = the routers' own decisions."""

    contexts: Sequence[int] = (512, 2048)
    batches: Sequence[int] = (1, 8)
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    skip_ratio: float | None = None
    variants: Sequence[str] = VARIANTS
    seed: int = 0

    def __post_init__(self) -> None:
        for label, values in (("context", self.contexts), ("batch", self.batches)):
            if not values or any(int(v) < 1 for v in values):
                raise BenchError(f"{label} sizes must be positive integers; got {list(values)}")
        if self.new_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise BenchError("new_tokens and repeats must be >= 1 and warmup >= 0")
        if self.skip_ratio is not None and (math.isnan(self.skip_ratio) or not 0.0 <= self.skip_ratio <= 1.0):
            raise BenchError(f"skip_ratio must be in [0, 1]; got {self.skip_ratio}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or "dense" not in self.variants or "routed" not in self.variants:
            raise BenchError(f"variants must include dense and routed, from {', '.join(VARIANTS)}; got {self.variants}")


def parse_sizes(text: str, label: str) -> list[int]:
    """``"512,2048"`` -> ``[512, 2048]``, with a clear error naming ``label``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"--{label} must be comma-separated positive integers; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise BenchError(f"--{label} must be comma-separated positive integers; got {text!r}")
    return values

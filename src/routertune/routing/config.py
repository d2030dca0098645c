"""RouterConfig: which layers get routers, at what granularity, and how they decide.

Knob names follow the seed project (granularity, router_layers with the aliases mod_n /
mindskip_n, threshold, target_capacity, gradient_scale) so that users find them where
they look for them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GRANULARITIES = (
    "attn_sequence",
    "attn_token",
    "mlp_sequence",
    "mlp_token",
    "block_sequence",
    "block_token",
)

# Names users type for router_layers, from the seed's launcher and entrypoint.
ROUTER_LAYERS_ALIASES = ("mod_n", "mindskip_n")


class RouterConfigError(ValueError):
    """A RouterConfig value (or a saved router_config.json) is invalid."""


@dataclass
class RouterConfig:
    """How routers are attached to a decoder-only model.

    Args:
        granularity: ``<target>_<unit>``; target is ``attn`` (skip self-attention), ``mlp``
            or ``block`` (both); unit is ``sequence`` (one decision per sequence, made on
            the mean of its non-padding tokens) or ``token`` (one decision per token).
        router_layers: how many of the deepest layers get a router, the last layer
            excluded (seed default 16 on a 32-layer model: layers 15..30).
        threshold: keep a unit iff ``sigmoid(logit) - threshold >= 0``. 0 keeps
            everything; a value above 1 skips every routed unit.
        target_capacity: optional share of routed units to keep; with
            ``gradient_scale > 0`` adds ``gradient_scale * relu(capacity - target)`` to
            the training loss.
        gradient_scale: weight of that capacity regulariser (0 = off, the seed default).
        layers: explicit layer indices to route instead of ``router_layers``.
        layer_thresholds: optional per-layer overrides of ``threshold`` (set by
            ``routertune calibrate``), keyed by layer index.
    """

    granularity: str = "attn_sequence"
    router_layers: int = 16
    threshold: float = 0.5
    target_capacity: float | None = None
    gradient_scale: float = 0.0
    layers: list[int] | None = None
    layer_thresholds: dict[int, float] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise RouterConfigError(
                f"granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}"
            )
        if isinstance(self.router_layers, bool) or not isinstance(self.router_layers, int):
            raise RouterConfigError(f"router_layers must be an integer; got {self.router_layers!r}")
        if self.router_layers < 0:
            raise RouterConfigError(f"router_layers must be >= 0; got {self.router_layers}")
        self.threshold = _finite_float("threshold", self.threshold)
        if self.threshold < 0:
            raise RouterConfigError(f"threshold must be >= 0; got {self.threshold}")
        if self.target_capacity is not None:
            self.target_capacity = _finite_float("target_capacity", self.target_capacity)
            if not 0.0 <= self.target_capacity <= 1.0:
                raise RouterConfigError(f"target_capacity must be in [0, 1]; got {self.target_capacity}")
        self.gradient_scale = _finite_float("gradient_scale", self.gradient_scale)
        if self.gradient_scale < 0:
            raise RouterConfigError(f"gradient_scale must be >= 0; got {self.gradient_scale}")
        if self.gradient_scale > 0 and self.target_capacity is None:
            raise RouterConfigError("gradient_scale > 0 needs a target_capacity for the capacity regulariser")
        if self.layers is not None:
            layers = list(self.layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise RouterConfigError(f"layers must be a list of integers; got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise RouterConfigError(f"layers has duplicates: {self.layers!r}")
            if any(i <= 0 for i in layers):
                raise RouterConfigError(
                    f"layers must be > 0 (layer 0 is never routed: it sizes the KV cache and masks); got {layers}"
                )
            self.layers = sorted(layers)
        if self.layer_thresholds is not None:
            self.layer_thresholds = {
                int(k): _finite_float(f"layer_thresholds[{k}]", v) for k, v in self.layer_thresholds.items()
            }
            if any(v < 0 for v in self.layer_thresholds.values()):
                raise RouterConfigError(f"layer_thresholds must be >= 0; got {self.layer_thresholds}")

    # ---- derived facts -------------------------------------------------------------
    @property
    def target(self) -> str:
        """``attn``, ``mlp`` or ``block``."""
        return self.granularity.split("_", 1)[0]

    @property
    def parts(self) -> tuple[str, ...]:
        """The sub-layers the target skips: ``("attn",)``, ``("mlp",)`` or both for ``block``."""
        return ("attn", "mlp") if self.target == "block" else (self.target,)

    @property
    def unit(self) -> str:
        """``sequence`` or ``token``."""
        return self.granularity.split("_", 1)[1]

    def routed_layer_indices(self, num_layers: int) -> list[int]:
        """Indices of the layers that get a router in a model with ``num_layers`` layers.

        The deepest ``router_layers`` layers except the last one, never layer 0.
        """
        if self.layers is not None:
            bad = [i for i in self.layers if i >= num_layers]
            if bad:
                raise RouterConfigError(f"layers {bad} do not exist in a model with {num_layers} layers")
            return list(self.layers)
        last_routable = num_layers - 2  # the last layer is never routed
        count = min(self.router_layers, max(last_routable, 0))
        return list(range(last_routable - count + 1, last_routable + 1))

    def threshold_for(self, layer_idx: int) -> float:
        if self.layer_thresholds and layer_idx in self.layer_thresholds:
            return self.layer_thresholds[layer_idx]
        return self.threshold

    # ---- (de)serialisation ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["layer_thresholds"] is not None:
            d["layer_thresholds"] = {str(k): v for k, v in d["layer_thresholds"].items()}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterConfig:
        """Builds a config from a dict; seed aliases are accepted, unknown keys warn."""
        data = dict(data)
        for alias in ROUTER_LAYERS_ALIASES:
            if alias in data:
                value = data.pop(alias)
                if "router_layers" in data and data["router_layers"] != value:
                    raise RouterConfigError(
                        f"router_layers={data['router_layers']} and its alias {alias}={value} disagree"
                    )
                data["router_layers"] = value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"RouterConfig: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RouterConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RouterConfigError(f"router config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise RouterConfigError("router config JSON must be an object")
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> RouterConfig:
        return cls.from_json(Path(path).read_text())


def _finite_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise RouterConfigError(f"{name} must be a number; got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RouterConfigError(f"{name} must be a number; got {value!r}") from None
    if not math.isfinite(out):
        raise RouterConfigError(f"{name} must be finite; got {value!r}")
    return out

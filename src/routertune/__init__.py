"""routertune: Router-Tuning / MindSkip dynamic depth for Hugging Face decoder-only LLMs.

    from routertune import RouterConfig, attach_routers, save_routers, load_routers
    from routertune import load_model_and_tokenizer, track_capacity, kv_cache_bytes

Where things live: ``routing/`` (the routing core), ``loading/`` (the model resolver),
``data/``, ``training/`` (``train.py`` is its entry point), ``evaluation/`` with ``tasks/``,
``benchmark/`` (timing, FLOPs, tables), ``baselines.py``, ``calibrate/`` (the calibration set, thresholds), ``analyze.py``,
``quickstart/`` (the main job as a recipe over these), and ``cli.py`` + ``commands/`` (one module
per verb). Names are imported lazily so that ``routertune --help`` does not pay for importing
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from routertune.version import __version__

_EXPORTS = {
    "GRANULARITIES": "routertune.routing.config",
    "RouterConfig": "routertune.routing.config",
    "RouterConfigError": "routertune.routing.config",
    "UnsupportedArchitectureError": "routertune.routing.arch",
    "attach_routers": "routertune.routing.attach",
    "detach_routers": "routertune.routing.attach",
    "RouterLoadError": "routertune.routing.router_files",
    "load_routers": "routertune.routing.router_files",
    "save_routers": "routertune.routing.router_files",
    "track_capacity": "routertune.routing.observe",
    "load_model_and_tokenizer": "routertune.loading",
    "kv_cache_bytes": "routertune.kv_cache",
}

__all__ = [
    "GRANULARITIES",
    "RouterConfig",
    "RouterConfigError",
    "RouterLoadError",
    "UnsupportedArchitectureError",
    "__version__",
    "attach_routers",
    "detach_routers",
    "kv_cache_bytes",
    "load_model_and_tokenizer",
    "load_routers",
    "save_routers",
    "track_capacity",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'routertune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from routertune.kv_cache import kv_cache_bytes
    from routertune.loading import load_model_and_tokenizer
    from routertune.routing.arch import UnsupportedArchitectureError
    from routertune.routing.attach import attach_routers, detach_routers
    from routertune.routing.config import GRANULARITIES, RouterConfig, RouterConfigError
    from routertune.routing.observe import track_capacity
    from routertune.routing.router_files import RouterLoadError, load_routers, save_routers

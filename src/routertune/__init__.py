"""routertune: Router-Tuning / MindSkip dynamic depth for Hugging Face decoder-only LLMs.

    from routertune import RouterConfig, attach_routers, save_routers, load_routers

Names are imported lazily so that ``routertune --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GRANULARITIES": "routertune.config",
    "RouterConfig": "routertune.config",
    "RouterConfigError": "routertune.config",
    "RouterLoadError": "routertune.model",
    "UnsupportedArchitectureError": "routertune.arch",
    "attach_routers": "routertune.model",
    "detach_routers": "routertune.model",
    "load_routers": "routertune.model",
    "save_routers": "routertune.model",
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
    "load_routers",
    "save_routers",
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
    from routertune.arch import UnsupportedArchitectureError
    from routertune.config import GRANULARITIES, RouterConfig, RouterConfigError
    from routertune.model import RouterLoadError, attach_routers, detach_routers, load_routers, save_routers

"""routertune: Router-Tuning / MindSkip dynamic depth for Hugging Face decoder-only LLMs.

from routertune import RouterConfig, attach_routers, save_routers, load_routers
"""

from __future__ import annotations

__version__ = "0.1.0"

from routertune.config import GRANULARITIES, RouterConfig, RouterConfigError  # noqa: E402
from routertune.model import (  # noqa: E402
    RouterLoadError,
    UnsupportedArchitectureError,
    attach_routers,
    detach_routers,
    load_routers,
    save_routers,
)

__all__ = [
    "GRANULARITIES",
    "RouterConfig",
    "RouterConfigError",
    "RouterLoadError",
    "UnsupportedArchitectureError",
    "attach_routers",
    "detach_routers",
    "load_routers",
    "save_routers",
    "__version__",
]

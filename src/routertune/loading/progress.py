"""Progress output of model loading: routertune's own lines on stderr, transformers' bars."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def hf_progress(enabled: bool) -> Iterator[None]:
    """Turns transformers' progress bars off inside the block when ``enabled`` is False."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            hf_logging.enable_progress_bar()


def say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)

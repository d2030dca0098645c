"""Router-Tuning training: arguments, losses, the Trainer subclass and the run that ties them.

    routertune train --data_type builtin --max_train_samples 1000 --output_dir runs/rt
    python -m routertune.train ...            (the same, e.g. under `accelerate launch`)

Heavy imports (torch, transformers) happen when a submodule is imported, not here.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from routertune.train import main as _main

    return _main(argv)

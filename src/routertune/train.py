"""Entry point of Router-Tuning training: ``python -m routertune.train`` / ``routertune train``.

    routertune train --model_name_or_path smollm2-135m-instruct --data_type builtin \\
        --max_train_samples 1000 --max_seq_length 512 --granularity attn_sequence --mod_n 16 \\
        --output_dir runs/rt
    accelerate launch --config_file configs/accelerate/deepspeed_zero1.yaml -m routertune.train ...

Flags are the seed's (``--router_layers``/``--mod_n``/``--mindskip_n``, ``--router_only``,
``--train_file``/``--data_type``, ``--max_train_samples`` ...) plus every
``transformers.TrainingArguments`` flag; ``--help`` lists them all. The output folder receives
``router_config.json`` + ``routers.safetensors`` (load them with ``routertune.load_routers``),
the LoRA adapter with ``--use_lora``, full weights with ``--router_only False``, and
``train_results.json``.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``), trains, and returns the exit status.

    Expected failures (bad flags or data, a model that cannot be found, routers that do not
    fit, a non-finite loss) print one ``Error:`` line to stderr and return 1.
    """
    from routertune.data import DataFormatError
    from routertune.loading import ModelResolutionError
    from routertune.routing.arch import UnsupportedArchitectureError
    from routertune.routing.config import RouterConfigError
    from routertune.routing.router_files import RouterLoadError
    from routertune.training.arguments import TrainArgumentError, parse_args
    from routertune.training.run import run
    from routertune.training.trainer import NonFiniteLossError

    expected = (
        TrainArgumentError,
        DataFormatError,
        RouterConfigError,
        RouterLoadError,
        UnsupportedArchitectureError,
        ModelResolutionError,
        NonFiniteLossError,
        FileNotFoundError,
    )
    from routertune.launch import leave_together

    try:
        config = parse_args(sys.argv[1:] if argv is None else list(argv))
        run(config)
    except expected as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return 1
    leave_together()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command-line arguments of ``routertune train``: the seed's names, parsed with HfArgumentParser.

Four small dataclasses plus :class:`RouterTrainingArguments` (``transformers.TrainingArguments``
with the seed's ``--router_only`` and a few routertune defaults), so every usual HF training flag
(``--bf16``, ``--gradient_checkpointing``, ``--save_steps``, ``--resume_from_checkpoint`` ...)
works unchanged. Everything that can be checked without a model is checked here, before any
weights are loaded.

Slightly over the house's ~400 lines on purpose: this is the one table of ``routertune train``'s
flags with their checks; split in two, a flag's default and the check that guards it would live
in different files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from routertune.data.encode import ROUTE_ON
from routertune.loading import DEFAULT_MODEL
from routertune.routing.config import GRANULARITIES, RouterConfig, RouterConfigError
from routertune.training.losses import DISTILL_TOKENS, LOSS_MODES

BUILTIN_DATA = "builtin"
MIXED_DATA = "mixed"


class TrainArgumentError(ValueError):
    """A ``routertune train`` flag is missing, malformed or contradicts another one."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": "Local Hugging Face folder, built-in model name or hub id (default: the built-in model)."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or name, if not the model's own."}
    )
    torch_dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype the weights are loaded in. float32 (default) with --bf16 gives the usual mixed precision; "
            "bfloat16 halves the memory of frozen weights in router-only training.",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: sdpa (default), eager, flash_attention_2 ..."}
    )
    router_dir: str | None = field(
        default=None,
        metadata={
            "help": "Start from routers saved in this folder (router_config.json + routers.safetensors)."
        },
    )


@dataclass
class RouterArguments:
    granularity: str = field(
        default="attn_sequence",
        metadata={"help": "What a router skips, and per what.", "choices": list(GRANULARITIES)},
    )
    router_layers: int = field(
        default=16,
        metadata={
            "help": "How many of the deepest layers (the last excluded) get a router.",
            "aliases": ["--mod_n", "--mindskip_n"],
        },
    )
    threshold: float = field(
        default=0.5, metadata={"help": "Keep a unit iff sigmoid(router(x)) - threshold >= 0."}
    )
    # Not the seed's defaults (regulariser off): with it on, routers skip more for less loss
    # (docs/training.md). gradient_scale reads as "nats per token a unit must be worth to stay on".
    target_capacity: float | None = field(
        default=0.0, metadata={"help": "Share of routed units to keep, for the capacity regulariser."}
    )
    gradient_scale: float = field(
        default=0.02,
        metadata={
            "help": "Weight of the regulariser gradient_scale * relu(capacity - target_capacity); 0 = off "
            "(the seed's default)."
        },
    )

    def router_config(self) -> RouterConfig:
        return RouterConfig(
            granularity=self.granularity,
            router_layers=self.router_layers,
            threshold=self.threshold,
            target_capacity=self.target_capacity,
            gradient_scale=self.gradient_scale,
        )


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None,
        metadata={"help": "Training data: a unified messages jsonl file (or a folder with data.jsonl)."},
    )
    data_type: str | None = field(
        default=None,
        metadata={
            "help": "Instead of --train_file: 'builtin' (the packaged offline mix, the default), 'mixed' "
            "(<data_root>/mixed/data.jsonl) or a dataset name (<data_root>/reformatted/<name>/data.jsonl)."
        },
    )
    data_root: str = field(default="data", metadata={"help": "Folder holding reformatted/ and mixed/."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N examples only."}
    )
    validation_samples: int = field(
        default=0,
        metadata={
            "help": "Hold out the LAST N examples of the data (never trained on) and report their LM loss, "
            "dense and routed, with the achieved capacity, after training."
        },
    )
    max_seq_length: int = field(
        default=2048, metadata={"help": "Truncate encoded examples to this many tokens."}
    )
    route_on: str = field(
        default="all",
        metadata={
            "help": "What *_sequence routers decide on in training: 'all' (the whole conversation, as the "
            "seed) or 'prompt' (the tokens before the first answer token, as generation and "
            "`routertune eval` route)."
        },
    )


@dataclass
class LossArguments:
    loss: str = field(
        default="lm",
        metadata={
            "help": "lm: next-token loss on assistant tokens; distill: KL(dense || routed) towards the model's own "
            "dense predictions (no labels needed); lm+distill: both.",
            "choices": list(LOSS_MODES),
        },
    )
    distill_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation term."})
    distill_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of the distillation."}
    )
    distill_tokens: str = field(
        default="labels",
        metadata={
            "help": "Positions distilled: labels (assistant tokens) or all.",
            "choices": list(DISTILL_TOKENS),
        },
    )


@dataclass
class LoraArguments:
    use_lora: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter together with the routers."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={
            "help": "Comma-separated module names to adapt, or 'all-linear' (routers are always excluded)."
        },
    )

    def target_modules(self) -> list[str] | str:
        text = self.lora_target_modules.strip()
        if text == "all-linear":
            return text
        return [name.strip() for name in text.split(",") if name.strip()]


@dataclass
class RouterTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the seed's ``--router_only``; defaults follow the seed's launcher
    where they make sense on any hardware (1 epoch, cosine, 3% warmup, no weight decay)."""

    router_only: bool = field(
        default=True,
        metadata={
            "help": "Train only the routers (and the LoRA adapter with --use_lora). False: full fine-tuning."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh even if output_dir holds checkpoints or a trained result."},
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "The seed's name: warmup as a share of the steps (sets --warmup_steps)."},
    )
    output_dir: str | None = field(
        default="trained_models/routertune", metadata={"help": "Where routers, checkpoints and metrics go."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training data."})
    learning_rate: float = field(
        default=0.1,
        metadata={
            "help": "Peak learning rate. Default by what is trained: 0.1 with SGD for routers only (measured on "
            "SmolLM2, see docs/training.md), 2e-4 with --use_lora, 2e-5 with --router_only False (both AdamW)."
        },
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Warmup steps, or a share of the steps if < 1."}
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch size per device."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    save_steps: float = field(default=100, metadata={"help": "Checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Batches are already model inputs."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "Every trainable parameter is used in every training forward, so DDP need not search."
        },
    )

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise TrainArgumentError(f"--warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


ARGUMENT_CLASSES = (
    ModelArguments,
    RouterArguments,
    DataArguments,
    LossArguments,
    LoraArguments,
    RouterTrainingArguments,
)


@dataclass
class TrainConfig:
    """Every argument group of one training run."""

    model: ModelArguments
    router: RouterArguments
    data: DataArguments
    loss: LossArguments
    lora: LoraArguments
    training: RouterTrainingArguments

    @property
    def router_config(self) -> RouterConfig:
        return self.router.router_config()


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(
        ARGUMENT_CLASSES,
        prog="routertune train",
        description="Router-Tuning: train routers that make an LLM skip layers.",
    )


# Optimizer defaults by what is trained, used for the flags the user did not give. Routers alone
# train best with plain SGD here (docs/training.md: Adam's sign-like steps move every router by
# the same amount and keep flipping whole layers); LoRA and full fine-tuning keep AdamW.
MODE_DEFAULTS: dict[str, dict[str, object]] = {
    "router_only": {"optim": "sgd", "learning_rate": 0.1},
    "lora": {"optim": "adamw_torch", "learning_rate": 2e-4},
    "full": {"optim": "adamw_torch", "learning_rate": 2e-5},
}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parses command-line flags (or a single ``.json`` file of them) and checks them.

    ``--optim`` and ``--learning_rate`` default by what is trained (:data:`MODE_DEFAULTS`) when
    they are not given.

    Raises:
        TrainArgumentError: for flags that contradict each other or cannot work.
        SystemExit: for unknown flags or bad values (argparse prints the usage).
    """
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return config_from_flags(json.loads(Path(os.path.abspath(argv[0])).read_text()))
    groups = build_parser().parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    return _finish(TrainConfig(*groups), given)


def config_from_flags(flags: Mapping[str, Any]) -> TrainConfig:
    """The config of a run from ``{flag name: value}`` (names without ``--``, native values),
    with the same defaults and checks as the command line; for recipes that compose a run.

        config_from_flags({"data_type": "builtin", "max_train_samples": 256, "output_dir": "runs/rt"})

    Raises:
        TrainArgumentError: as :func:`parse_args`, or for a name that is no training flag.
    """
    try:
        groups = build_parser().parse_dict(dict(flags), allow_extra_keys=False)
    except ValueError as exc:  # unknown names
        raise TrainArgumentError(str(exc)) from None
    return _finish(TrainConfig(*groups), set(flags))


def _finish(config: TrainConfig, given: set[str]) -> TrainConfig:
    apply_mode_defaults(config, given)
    validate(config)
    return config


def training_mode(config: TrainConfig) -> str:
    if config.lora.use_lora:
        return "lora"
    return "router_only" if config.training.router_only else "full"


def apply_mode_defaults(config: TrainConfig, given: set[str]) -> None:
    """Sets ``optim`` and ``learning_rate`` from :data:`MODE_DEFAULTS` unless given explicitly."""
    from transformers.training_args import OptimizerNames

    for name, value in MODE_DEFAULTS[training_mode(config)].items():
        if name in given:
            continue
        if name == "optim":
            value = OptimizerNames(value)
        setattr(config.training, name, value)


def validate(config: TrainConfig) -> None:
    """Checks that need no model: consistent flags, a router config that can exist, data that exists."""
    d, loss, lora, t = config.data, config.loss, config.lora, config.training
    try:
        config.router_config  # noqa: B018 - building it validates granularity, thresholds, capacity
    except RouterConfigError as exc:
        raise TrainArgumentError(str(exc)) from None
    if d.train_file and d.data_type:
        raise TrainArgumentError("pass either --train_file or --data_type, not both")
    if d.max_train_samples is not None and d.max_train_samples <= 0:
        raise TrainArgumentError(f"--max_train_samples must be > 0; got {d.max_train_samples}")
    if d.validation_samples < 0:
        raise TrainArgumentError(f"--validation_samples must be >= 0; got {d.validation_samples}")
    if d.max_seq_length < 2:
        raise TrainArgumentError(f"--max_seq_length must be >= 2; got {d.max_seq_length}")
    if d.route_on not in ROUTE_ON:
        raise TrainArgumentError(f"--route_on must be 'all' or 'prompt'; got {d.route_on!r}")
    if loss.distill_weight < 0:
        raise TrainArgumentError(f"--distill_weight must be >= 0; got {loss.distill_weight}")
    if loss.distill_temperature <= 0:
        raise TrainArgumentError(f"--distill_temperature must be > 0; got {loss.distill_temperature}")
    if lora.use_lora:
        if lora.lora_r <= 0:
            raise TrainArgumentError(f"--lora_r must be > 0; got {lora.lora_r}")
        if not 0.0 <= lora.lora_dropout < 1.0:
            raise TrainArgumentError(f"--lora_dropout must be in [0, 1); got {lora.lora_dropout}")
        if not lora.target_modules():
            raise TrainArgumentError("--lora_target_modules is empty")
        if not t.router_only:
            raise TrainArgumentError(
                "--use_lora trains routers + LoRA; it cannot be combined with --router_only False"
            )
    resolve_train_source(d)  # raises for a missing file


def resolve_train_source(data: DataArguments) -> str | Path:
    """What the data flags name: ``"builtin"`` or an existing jsonl path.

    Follows the seed's launcher: ``--data_type mixed`` is ``<data_root>/mixed/data.jsonl`` and any
    other name is ``<data_root>/reformatted/<name>/data.jsonl``.

    Raises:
        TrainArgumentError: when the file does not exist, saying which flag named it.
    """
    if data.train_file:
        path = Path(data.train_file)
        if path.is_dir():
            path = path / "data.jsonl"
        if not path.is_file():
            raise TrainArgumentError(f"--train_file {data.train_file}: no such file")
        return path
    data_type = data.data_type or BUILTIN_DATA
    if data_type == BUILTIN_DATA:
        return BUILTIN_DATA
    root = Path(data.data_root)
    if data_type == MIXED_DATA:
        path = root / MIXED_DATA / "data.jsonl"
        hint = "run `routertune data mix` first"
    else:
        path = root / "reformatted" / data_type / "data.jsonl"
        hint = "run `routertune data reformat` first, or check the dataset name"
    if not path.is_file():
        raise TrainArgumentError(f"--data_type {data_type}: {path} does not exist ({hint})")
    return path

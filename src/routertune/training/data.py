"""Training data for ``routertune train``: examples read and checked before any model loads.

Reading uses the data package (``load_training_examples``: the builtin mix, or a unified messages
jsonl checked line by line); encoding uses its chat-template encoder (loss on assistant tokens
only) and its right-padding collator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from routertune.data import encode_examples, load_training_examples
from routertune.data.encode import IGNORE_INDEX, ROUTE_ON, prompt_routing_mask
from routertune.training.arguments import DataArguments, TrainArgumentError, resolve_train_source


@dataclass
class TrainingExamples:
    """Unified-format examples to train on and, optionally, held-out ones to evaluate on."""

    source: str
    train: list[dict]
    validation: list[dict] = field(default_factory=list)


def load_examples(data: DataArguments) -> TrainingExamples:
    """Reads and validates the examples the data flags name (no tokenizer or model needed).

    Held-out examples are the LAST ``validation_samples`` of the data; training takes the first
    ``max_train_samples`` of the rest, so the two never overlap.

    Raises:
        TrainArgumentError: missing file, or no example left to train on.
        DataFormatError: a malformed line, empty ``messages``, an unknown role (file and line named).
    """
    source = resolve_train_source(data)
    if data.validation_samples:
        examples = load_training_examples(source)
        if len(examples) <= data.validation_samples:
            raise TrainArgumentError(
                f"{source} has {len(examples)} examples; --validation_samples {data.validation_samples} leaves none "
                "to train on"
            )
        validation = examples[-data.validation_samples :]
        train = examples[: -data.validation_samples][: data.max_train_samples]
    else:
        train = load_training_examples(source, data.max_train_samples)
        validation = []
    if not train:
        raise TrainArgumentError(f"{source} holds no training example")
    return TrainingExamples(source=str(source), train=train, validation=validation)


class EncodedDataset(Dataset):
    """Encoded examples (``input_ids`` / ``labels`` / ``attention_mask`` lists) as a torch Dataset."""

    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]

    def num_label_tokens(self) -> int:
        return sum(sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in self.examples)

    def num_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


def encode(
    examples: list[dict], tokenizer: Any, max_seq_length: int, what: str, route_on: str = "all"
) -> EncodedDataset:
    """Encodes examples; fails if none keeps an assistant token to learn from.

    ``route_on="prompt"`` adds each example's ``routing_mask`` (:func:`prompt_routing_mask`).
    """
    if route_on not in ROUTE_ON:
        raise TrainArgumentError(f"--route_on must be one of {ROUTE_ON}; got {route_on!r}")
    encoded = encode_examples(examples, tokenizer, max_seq_length)
    if not len(encoded):
        reasons = ", ".join(f"{k}: {v}" for k, v in encoded.dropped.items())
        raise TrainArgumentError(f"no {what} example has an assistant token to learn from ({reasons})")
    items = list(encoded.examples)
    if route_on == "prompt":
        items = [{**e, "routing_mask": prompt_routing_mask(e["labels"])} for e in items]
    return EncodedDataset(items)


@torch.no_grad()
def lm_loss_and_capacity(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    collator: Any,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    routed: bool = True,
) -> dict[str, Any]:
    """Mean next-token loss per label token of ``dataset``, and (routed) the share of units kept.

    The model runs in eval mode, where skipped units are really not computed; ``routed=False``
    runs every unit (the dense model, same weights).

    Returns:
        ``{"loss", "perplexity", "tokens"}`` plus ``"capacity"`` (``track_capacity`` dict) when routed.
    """
    from contextlib import nullcontext

    from routertune.routing.attach import all_units_kept, get_router_config
    from routertune.routing.observe import track_capacity

    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    has_routers = get_router_config(model) is not None
    total, count = torch.zeros((), dtype=torch.float64), 0
    try:
        if routed and has_routers:
            ctx = track_capacity(model)
        elif has_routers:
            ctx = all_units_kept(model)
        else:
            ctx = nullcontext()
        with ctx as stats:
            for start in range(0, len(dataset), batch_size):
                batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = batch.pop("labels")
                logits = model(**batch).logits.float()  # (B, T, V)
                targets = labels[:, 1:]  # (B, T-1)
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                total += losses.double().cpu()
                count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    loss = float(total / max(count, 1))
    out: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
    if routed and has_routers:
        out["capacity"] = stats.as_dict()
    return out


def describe_source(source: str) -> str:
    return source if source == "builtin" else str(Path(source).resolve())

"""The calibration set: instruction examples held out from training, as left-padded batches.

    fit, heldout = calibration_split("builtin", n=64, n_heldout=32)
    batches = make_batches(tokenizer, fit, route_on="prompt")

Thresholds (:mod:`routertune.calibrate.thresholds`), the attention-drop baseline
(:mod:`routertune.baselines`) and the routing analysis (:mod:`routertune.analyze`) are all
calibrated or measured on these batches; :func:`routertune.routing.observe.run_batches` runs the
model over them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEFAULT_N = 64  # calibration examples
DEFAULT_HELDOUT = 32  # held-out examples the achieved capacity is checked on


class CalibrationError(ValueError):
    """Invalid calibration inputs: capacity out of range, empty data, a model without routers."""


def calibration_split(
    source: str | Path = "builtin", n: int = DEFAULT_N, n_heldout: int = DEFAULT_HELDOUT
) -> tuple[list, list]:
    """Instruction examples to calibrate on, and held-out ones to check the result on.

    ``builtin``: the last ``n`` examples of the built-in mix, and the ``n_heldout`` before them.
    Training takes the mix from its start (``--max_train_samples`` of 4,083), so the tail is
    not trained on unless a run uses nearly all of it. None of it is evaluation data.
    A jsonl file (or a folder with ``data.jsonl``): its first ``n`` examples, then the next
    ``n_heldout``.

    Returns:
        ``(fit, heldout)``: lists of unified-format examples; ``heldout`` may be shorter than
        ``n_heldout`` (or empty) when the file runs out.

    Raises:
        CalibrationError: ``n < 1``, ``n_heldout < 0``, or no example to calibrate on.
        FileNotFoundError, DataFormatError: from reading the file.
    """
    from routertune.data import builtin_messages, load_training_examples

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CalibrationError(f"the number of calibration examples must be >= 1; got {n!r}")
    if isinstance(n_heldout, bool) or not isinstance(n_heldout, int) or n_heldout < 0:
        raise CalibrationError(f"the number of held-out examples must be >= 0; got {n_heldout!r}")
    if str(source) == "builtin":
        examples = builtin_messages()
        if n + n_heldout > len(examples):
            raise CalibrationError(
                f"the builtin mix has {len(examples)} examples; asked for {n} + {n_heldout} held-out"
            )
        end = len(examples)
        return examples[end - n :], examples[end - n - n_heldout : end - n]
    examples = load_training_examples(source)
    if not examples:
        raise CalibrationError(f"calibration data {source} holds no example")
    return examples[:n], examples[n : n + n_heldout]


def _encode(tokenizer: Any, item: Any, max_length: int) -> tuple[list[int], list[int] | None] | None:
    """Token ids (and loss labels, for examples) of one text or unified-format example."""
    from routertune.data import encode_example, render_messages

    if isinstance(item, str):
        ids = list(tokenizer(item)["input_ids"])
        return (ids[:max_length], None) if ids else None
    if not isinstance(item, dict):
        raise CalibrationError(
            f"calibration item must be a text or an example dict; got {type(item).__name__}"
        )
    encoded = encode_example(item, tokenizer)
    if encoded is not None:
        return encoded["input_ids"][:max_length], encoded["labels"][:max_length]
    if "messages" not in item:
        return None
    # No assistant turn: nothing to score a loss on, but still a valid input to route.
    text, _, add_special = render_messages(item["messages"], tokenizer)
    ids = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
    return (ids[:max_length], None) if ids else None


def make_batches(
    tokenizer: Any, data: list, batch_size: int = 8, max_length: int = 512, route_on: str = "all"
) -> list[dict[str, torch.Tensor]]:
    """Tokenises texts or unified-format examples into left-padded batches.

    Examples are rendered as in training (chat template, whole conversation) and cut to
    ``max_length`` tokens; they are sorted by length so that batches carry little padding.
    Items that already are batches (dicts with ``input_ids``) are passed through.

    ``route_on="prompt"`` adds a ``routing_mask``: sequence routers then decide on each
    example's prompt (the tokens before its first answer token), as generation and
    ``routertune eval`` route, so the calibrated share is the share kept in use. Texts and
    examples without an answer are all prompt. Token routers ignore the mask.

    Returns:
        Dicts with ``input_ids`` ``(B, T)`` long, ``attention_mask`` ``(B, T)`` long (0 on
        padding), for examples ``labels`` ``(B, T)`` (-100 outside assistant turns) and, with
        ``route_on="prompt"``, ``routing_mask`` ``(B, T)`` long.

    Raises:
        CalibrationError: empty data, no item yields a token, or an unknown ``route_on``.
    """
    import torch

    from routertune.data.encode import ROUTE_ON, prompt_routing_mask

    if batch_size < 1 or max_length < 1:
        raise CalibrationError(f"batch_size and max_length must be >= 1; got {batch_size}, {max_length}")
    if route_on not in ROUTE_ON:
        raise CalibrationError(f"route_on must be one of {', '.join(ROUTE_ON)}; got {route_on!r}")
    if not data:
        raise CalibrationError("the calibration set is empty")
    if all(isinstance(item, dict) and "input_ids" in item for item in data):
        return list(data)
    encoded = [e for e in (_encode(tokenizer, item, max_length) for item in data) if e is not None]
    if not encoded:
        raise CalibrationError(f"none of the {len(data)} calibration items yields tokens")
    encoded.sort(key=lambda e: -len(e[0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        T = len(chunk[0][0])  # longest first
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        routing = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, (tokens, lab) in enumerate(chunk):
            n = len(tokens)
            ids[b, T - n :] = torch.tensor(tokens)
            mask[b, T - n :] = 1
            if lab is not None:
                labels[b, T - n :] = torch.tensor(lab)
            routing[b, T - n :] = torch.tensor(prompt_routing_mask(lab) if lab is not None else [1] * n)
        batch = {"input_ids": ids, "attention_mask": mask}
        if any(lab is not None for _, lab in chunk):
            batch["labels"] = labels
        if route_on == "prompt":
            batch["routing_mask"] = routing
        batches.append(batch)
    return batches

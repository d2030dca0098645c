"""Turn examples into ``input_ids`` / ``labels`` / ``attention_mask`` with loss on assistant tokens only.

Two example shapes are accepted, as in the seed's training script:

- ``{"messages": [...]}``: rendered with the tokenizer's chat template when it has one, else with
  the seed's plain format ``<|system|>\\n...\\n<|user|>\\n...\\n<|assistant|>\\n...<eos>\\n``.
- ``{"prompt": str, "completion": str}``: ``prompt + completion + eos``, loss on the completion.

Assistant spans are found in character space and mapped to tokens through the tokenizer's
offsets: the span of assistant turn ``i`` starts where the rendering of ``messages[:i]`` with the
generation prompt ends and stops where the rendering of ``messages[:i + 1]`` ends (trailing
whitespace excluded), so the end-of-turn token is learned but the role header is not. A template
whose renderings are not prefixes of one another (one that rewrites earlier turns) is rejected.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from routertune.data.messages import DataFormatError, load_messages_jsonl, validate_example

IGNORE_INDEX = -100
# What sequence routers decide on when a forward holds a prompt and its answer (training,
# calibration, evaluation): the whole sequence, or the prompt alone, as generation routes.
ROUTE_ON = ("all", "prompt")

__all__ = [
    "IGNORE_INDEX",
    "ROUTE_ON",
    "ChatTemplateError",
    "EncodedData",
    "PaddingCollator",
    "encode_example",
    "encode_examples",
    "load_messages_jsonl",
    "prompt_routing_mask",
    "render_messages",
]


def prompt_routing_mask(labels: list[int]) -> list[int]:
    """1 for the tokens before the first learnt token (the prompt), 0 from there on.

    Generation routes a request on its prompt alone (prefill, up to the assistant header); this
    mask makes training and calibration decide on the same tokens.
    """
    first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    return [1] * first + [0] * (len(labels) - first)


class ChatTemplateError(ValueError):
    """A chat template whose output cannot be split into turns by rendering prefixes."""


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _apply_template(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise ChatTemplateError(
            f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str"
        )
    return text


def _template_render(messages: list[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    full = _apply_template(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _apply_template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(before) or not full.startswith(through) or len(through) < len(before):
            raise ChatTemplateError(
                "the chat template renders a conversation prefix that is not a prefix of the whole "
                f"conversation (at message {i}); assistant turns cannot be located"
            )
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return full, spans


def _plain_render(messages: list[dict], eos_token: str) -> tuple[str, list[tuple[int, int]]]:
    """The seed's format for tokenizers without a chat template."""
    text = ""
    spans = []
    for message in messages:
        content = message["content"].strip()
        if message["role"] == "assistant":
            text += "<|assistant|>\n"
            spans.append((len(text), len(text) + len(content) + len(eos_token)))
            text += content + eos_token + "\n"
        else:
            text += f"<|{message['role']}|>\n{content}\n"
    return text.strip(), spans


def render_messages(messages: list[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int]], bool]:
    """Renders a conversation to text and the character spans that carry the loss.

    Returns:
        ``(text, spans, add_special_tokens)``: spans are ``[start, end)`` character ranges of the
        assistant turns; ``add_special_tokens`` says whether the tokenizer should add its own BOS
        (not for chat templates, which write their own).
    """
    if _has_chat_template(tokenizer):
        text, spans = _template_render(messages, tokenizer)
        return text, spans, False
    eos = _eos_token(tokenizer)
    text, spans = _plain_render(messages, eos)
    return text, spans, True


def _eos_token(tokenizer: Any) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ValueError("the tokenizer has neither a chat template nor an eos token; cannot mark turn ends")
    return eos


def _render_prompt_completion(example: dict, tokenizer: Any) -> tuple[str, list[tuple[int, int]], bool]:
    prompt, completion = example["prompt"], example["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataFormatError("fields 'prompt' and 'completion' must be strings")
    # As the seed: a space between them unless one side already has whitespace.
    sep = "" if prompt.endswith((" ", "\n", "\t")) or completion.startswith((" ", "\n", "\t")) else " "
    text = prompt + sep + completion + _eos_token(tokenizer)
    return text, [(len(prompt) + len(sep), len(text))], True


def _labels_from_offsets(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    starts = [s for s, _ in spans]
    mask = []
    for begin, end in offsets:
        if end <= begin:  # tokens the tokenizer added itself (BOS) have empty offsets
            mask.append(False)
            continue
        k = bisect.bisect_right(starts, begin) - 1
        mask.append(k >= 0 and begin < spans[k][1])
    return mask


def _tokenize(
    text: str, spans: list[tuple[int, int]], tokenizer: Any, add_special: bool
) -> tuple[list[int], list[bool]]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        return list(enc["input_ids"]), _labels_from_offsets(enc["offset_mapping"], spans)
    # Without offsets: count the tokens of each span's prefix (the seed's method).
    ids = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
    mask = [False] * len(ids)
    for start, end in spans:
        first = len(tokenizer(text[:start], add_special_tokens=add_special)["input_ids"])
        last = len(tokenizer(text[:end], add_special_tokens=add_special)["input_ids"])
        for j in range(first, min(last, len(ids))):
            mask[j] = True
    return ids, mask


def _encode(example: dict, tokenizer: Any, max_seq_length: int | None) -> tuple[dict | None, str | None]:
    if "messages" in example:
        text, spans, add_special = render_messages(example["messages"], tokenizer)
    elif "prompt" in example and "completion" in example:
        text, spans, add_special = _render_prompt_completion(example, tokenizer)
    else:
        raise DataFormatError(
            f"example has neither 'messages' nor 'prompt'/'completion' (keys: {sorted(example)})"
        )
    ids, mask = _tokenize(text, spans, tokenizer, add_special)
    if not any(mask):
        return None, "no assistant tokens"
    if max_seq_length is not None and len(ids) > max_seq_length:
        ids, mask = ids[:max_seq_length], mask[:max_seq_length]
        if not any(mask):
            return None, "no assistant tokens after truncation"
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, mask, strict=True)]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}, None


def encode_example(example: dict, tokenizer: Any, max_seq_length: int | None = None) -> dict | None:
    """Encodes one example; ``None`` when no assistant token is left to learn from.

    Args:
        example: ``{"messages": [...]}`` (unified format) or ``{"prompt": ..., "completion": ...}``.
        tokenizer: a Hugging Face tokenizer.
        max_seq_length: keep at most this many tokens (the start of the conversation).

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "attention_mask": list[int]}``, all of length
        ``L <= max_seq_length``; ``labels`` is ``-100`` outside assistant turns.
    """
    return _encode(example, tokenizer, max_seq_length)[0]


@dataclass
class EncodedData:
    """Encoded examples plus the count of those dropped, by reason."""

    examples: list[dict]
    dropped: Counter = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        return len(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def encode_examples(
    examples: Iterable[dict], tokenizer: Any, max_seq_length: int | None = None
) -> EncodedData:
    """Encodes many examples (see :func:`encode_example`), dropping and counting label-less ones.

    Raises:
        DataFormatError: for an example that is not valid, naming its position and id.
    """
    result = EncodedData(examples=[])
    for index, example in enumerate(examples):
        where = f"example {index}" + (
            f" (id {example['id']!r})" if isinstance(example, dict) and "id" in example else ""
        )
        if isinstance(example, dict) and "messages" in example:
            validate_example(example, where)
        try:
            encoded, reason = _encode(example, tokenizer, max_seq_length)
        except DataFormatError as e:
            raise DataFormatError(f"{where}: {e}") from None
        if encoded is None:
            result.dropped[reason] += 1
        else:
            result.examples.append(encoded)
    return result


@dataclass
class PaddingCollator:
    """Pads a batch on the right: ``input_ids`` with ``pad_token_id``, ``labels`` with -100, masks
    (``attention_mask``, and ``routing_mask`` when the examples have one) with 0.

    Returns tensors of shape ``(B, T)`` with ``T`` the longest length in the batch, rounded up to
    ``pad_to_multiple_of`` when set.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> PaddingCollator:
        """Uses the tokenizer's pad token, else its eos token (masked out anyway), else 0."""
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        return cls(pad_token_id=0 if pad is None else int(pad), pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
        has_labels = "labels" in features[0]
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for row, (feature, length) in enumerate(zip(features, lengths, strict=True)):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            mask = feature.get("attention_mask")
            attention_mask[row, :length] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
            if labels is not None:
                labels[row, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            out["labels"] = labels
        if "routing_mask" in features[0]:  # tokens sequence routers decide on (padding: 0)
            routing = torch.zeros((batch, width), dtype=torch.long)
            for row, (feature, length) in enumerate(zip(features, lengths, strict=True)):
                routing[row, :length] = torch.as_tensor(feature["routing_mask"], dtype=torch.long)
            out["routing_mask"] = routing
        return out

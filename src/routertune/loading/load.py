"""Load a resolved model and its tokenizer, ready for inference.

    from routertune import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")   # or a folder / hub id
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from routertune.loading.builtin import BuiltinModel
from routertune.loading.progress import hf_progress
from routertune.loading.resolve import resolve

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``"fp16"``/``"float32"``/a torch dtype/None -> torch dtype or None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16 (bf16), float16 (fp16)")
    return getattr(torch, _DTYPE_NAMES[key])


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    *,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    builtins: Mapping[str, BuiltinModel] | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolves ``name_or_path`` and loads the causal LM and its tokenizer, ready for inference.

    Defaults: float32 on CPU; on CUDA (the default device when one is visible) bfloat16.
    The model is in ``eval()`` mode and ``model.config._name_or_path`` holds the user-facing
    name (the built-in name, the hub id, or the folder's absolute path), which router files
    record as their base model.

    Tokenizer: when it has no pad token, the eos token is used for padding, and
    ``padding_side`` is set to ``"left"``: decoder-only generation appends new tokens on
    the right, so a batch of prompts must be padded on the left to end at the same position.
    (Training code that pads labels on the right sets ``padding_side`` itself.)

    Args:
        name_or_path: a local folder, a built-in name or a hub id (see ``resolve_model``).
        dtype: ``torch.dtype`` or a name (``float32``, ``bf16``, ``fp16``); None = default above.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None = CUDA when available, else CPU.
        device_map: instead of one device, transformers' placement of a model too big for one
            (``"auto"``, or ``{module name: device}``): weights load straight onto their
            devices; routers attached later go to the device of their layer. Not with ``device``.
        attn_implementation: the attention kernel (``sdpa``, ``eager``, ``flex_attention``,
            ``flash_attention_2``...); None = transformers' default (sdpa). A kernel this machine
            cannot run raises ValueError naming it.
        builtins, cache, progress: as for ``resolve_model``.

    Returns:
        ``(model, tokenizer)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and device is not None:
        raise ValueError("give device or device_map, not both")
    resolved = resolve(name_or_path, builtins=builtins, cache=cache, progress=progress)
    device = torch.device(device if device is not None else default_device())
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    with hf_progress(progress):
        kernel = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                resolved.path, dtype=torch_dtype, device_map=device_map, **kernel
            )
        except ImportError as err:  # a kernel whose package is missing, e.g. flash-attn
            raise ValueError(f"attention kernel {attn_implementation!r}: {err}") from err
    if device_map is None:
        model.to(device)
    model.eval()
    model.config._name_or_path = resolved.name
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

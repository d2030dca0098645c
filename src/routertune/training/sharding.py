"""Training on sharded weights: what changes under DeepSpeed ZeRO-3 and FSDP2.

Under ZeRO-1/2 and DDP every process holds every weight, and routers are read and written like
any tensor. Under ZeRO-3 each parameter lives as a slice per process (``ds_tensor``; the
parameter itself is an empty placeholder outside the forward of its module), and under FSDP2 a
parameter is a ``DTensor`` sharded across the mesh. Three things then need every process:

* reading the trained weights to save them (routers, the LoRA adapter): gathered with the
  engine's own collective (:func:`full_copies`), then written by the main process;
* writing loaded weights into the model (resuming): each process keeps its shard of the full
  tensor (:func:`routertune.routing.router_files.copy_into_parameter`);
* forwards outside the training loop (the held-out evaluation after training): run on every
  process, since each forward gathers the weights from all of them.

Full fine-tuning under ZeRO-3 / FSDP2 is refused (:func:`check_supported`): saving all weights
would need the engine's full-state-dict path, which routertune does not drive.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

ZERO3 = "deepspeed_zero3"
FSDP = "fsdp"


def sharded_engine(args: Any) -> str | None:
    """``"deepspeed_zero3"``, ``"fsdp"``, or None (every process holds every weight).

    Read from the training arguments (``--deepspeed`` config or accelerate's DeepSpeed plugin)
    and from accelerate's launch environment (FSDP), so it is known before a model is loaded.
    """
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        return ZERO3
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or getattr(args, "fsdp", None):
        return FSDP
    return None


def check_supported(engine: str | None, router_only: bool) -> None:
    """Refuses what routertune cannot do on sharded weights, before any weight is loaded.

    Raises:
        ValueError: full fine-tuning (``--router_only False``) under ZeRO-3 or FSDP.
    """
    if engine is not None and not router_only:
        raise ValueError(
            f"full fine-tuning (--router_only False) is not supported under {engine}: train routers "
            "(optionally with --use_lora) there, or fine-tune all weights under ZeRO-1/2 or DDP"
        )


def full_copies(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Full CPU copies of ``params``, on every process.

    A collective under ZeRO-3 (``GatheredParameters``) and FSDP2 (``DTensor.full_tensor``):
    every process must call it with the same parameters, in the same order.
    """
    if any(hasattr(p, "ds_tensor") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return [p.detach().cpu().clone() for p in params]
    out = []
    for p in params:
        value = p.detach()
        if hasattr(value, "full_tensor"):  # a DTensor (FSDP2)
            value = value.full_tensor()
        out.append(value.cpu().clone())
    return out


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this process holds: its ZeRO-3 partition (``ds_tensor``) or
    FSDP2 shard (the DTensor's local tensor) of each parameter, else the whole parameter."""
    total = 0
    for p in {id(q): q for q in model.parameters()}.values():
        if hasattr(p, "ds_tensor"):
            held = p.ds_tensor
        elif hasattr(p, "to_local"):
            held = p.to_local()
        else:
            held = p
        total += held.numel() * held.element_size()
    return total

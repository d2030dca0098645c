"""Router files: ``router_config.json`` + ``routers.safetensors``, routers only (kilobytes).

    save_routers(model, "my_routers")
    load_routers(plain_model, "my_routers")      # attaches, then loads the weights and thresholds

A folder records the router config, the routed layers and the shape of the model it was saved
from; loading refuses files that do not match the model, naming what differs. A folder written
by ``routertune train --use_lora`` also holds the LoRA adapter trained with the routers
(``adapter_config.json`` + ``adapter_model.safetensors``, plain module names): loading merges it
into the model's weights before the routers attach, so the routed model is the one trained.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from routertune.io_utils import atomic_path, atomic_write_text
from routertune.routing.arch import decoder_layers
from routertune.routing.attach import attach_routers, get_router_config, require_config, routed_layers
from routertune.routing.config import RouterConfig, RouterConfigError

CONFIG_NAME = "router_config.json"
WEIGHTS_NAME = "routers.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's names for a LoRA adapter saved beside the routers
ADAPTER_WEIGHTS = "adapter_model.safetensors"

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "RouterLoadError",
    "copy_adapter",
    "copy_into_parameter",
    "load_routers",
    "merge_lora_adapter",
    "read_router_files",
    "save_routers",
]


class RouterLoadError(ValueError):
    """Saved routers are missing, corrupt, or do not match the model."""


def save_routers(model: nn.Module, path: str | Path, weights: Mapping[int, torch.Tensor] | None = None) -> Path:
    """Writes ``router_config.json`` and ``routers.safetensors`` (routers only) into ``path``.

    Each file is written to a temporary name and renamed, so a crash leaves either the old file
    or the new one.

    Args:
        weights: layer index -> full router weight, for models whose parameters are sharded
            across processes (gathered beforehand, see :mod:`routertune.training.sharding`);
            default: read from the model.
    """
    from safetensors.torch import save_file

    from routertune.version import __version__

    config = require_config(model)
    layers = routed_layers(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if weights is None:
        weights = {i: layer.router.proj.weight for i, layer in layers.items()}
    if set(weights) != set(layers):
        raise ValueError(f"router weights for layers {sorted(weights)}; the model routes {sorted(layers)}")
    tensors = {f"layers.{i}.weight": weights[i].detach().float().cpu().contiguous() for i in sorted(layers)}
    hidden = model.config.hidden_size
    bad = [k for k, w in tensors.items() if tuple(w.shape) != (1, hidden)]
    if bad:  # e.g. the empty placeholders of ZeRO-3-partitioned parameters, read without gathering
        raise ValueError(
            f"router weights {bad} are not (1, {hidden}) (got {tuple(tensors[bad[0]].shape)}): "
            "parameters sharded across processes must be gathered first"
        )
    meta = {
        "routertune_version": __version__,
        "router_config": config.to_dict(),
        "routed_layers": sorted(layers),
        "base_model": getattr(model.config, "_name_or_path", None) or None,
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": model.config.hidden_size,
        "num_hidden_layers": len(decoder_layers(model)),
    }
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "routertune_version": __version__})
    atomic_write_text(path / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_router_files(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Reads and checks a saved router folder without touching any model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise RouterLoadError(f"router folder {path} does not exist")
    for f in (config_file, weights_file):
        if not f.is_file():
            raise RouterLoadError(f"{f} is missing (a router folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise RouterLoadError(f"{config_file} is not valid JSON: {exc}") from exc
    missing = [
        k for k in ("router_config", "hidden_size", "num_hidden_layers", "routed_layers") if k not in meta
    ]
    if missing:
        raise RouterLoadError(f"{config_file} lacks {', '.join(missing)}")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RouterLoadError(f"{weights_file} is corrupt or unreadable: {exc}") from exc
    return meta, tensors


def load_routers(model: nn.Module, path: str | Path, merge_adapter: bool = True) -> nn.Module:
    """Attaches (if needed) and loads saved routers into ``model``; returns it.

    A LoRA adapter in the folder (trained together with the routers) is merged into the
    model's weights first; the model must then be without routers. ``merge_adapter=False``
    loads the routers only, for a caller that applies the adapter itself (training's resume,
    a model already merged with ``PeftModel.from_pretrained(...).merge_and_unload()``).

    Raises:
        RouterLoadError: missing or corrupt files, routers saved for another model shape
            (hidden size, layer count) or another granularity than the model's routers, or an
            adapter that does not match the model or meets a model that already has routers.
    """
    meta, tensors = read_router_files(path)
    hidden, num_layers = model.config.hidden_size, len(decoder_layers(model))
    if meta["hidden_size"] != hidden or meta["num_hidden_layers"] != num_layers:
        raise RouterLoadError(
            f"routers in {path} were saved for a model with hidden_size={meta['hidden_size']} and "
            f"{meta['num_hidden_layers']} layers (base model {meta.get('base_model')!r}); this model has "
            f"hidden_size={hidden} and {num_layers} layers"
        )
    try:
        config = RouterConfig.from_dict(meta["router_config"])
    except (RouterConfigError, TypeError) as exc:
        raise RouterLoadError(f"{Path(path) / CONFIG_NAME}: invalid router_config: {exc}") from exc
    # The saved layer list is authoritative (it already excludes mask-anchor layers).
    config.layers = [int(i) for i in meta["routed_layers"]]
    current = get_router_config(model)
    if merge_adapter and (Path(path) / ADAPTER_CONFIG).exists():
        if current is not None:
            raise RouterLoadError(
                f"{path} holds a LoRA adapter trained with its routers; load it into a model without "
                "routers (the adapter is merged into the plain weights before the routers attach)"
            )
        merge_lora_adapter(model, path)
    if current is None:
        attach_routers(model, config)
    elif current.granularity != config.granularity:
        raise RouterLoadError(
            f"routers in {path} use granularity {config.granularity}, the model's routers use {current.granularity}"
        )
    layers = routed_layers(model)
    expected = {f"layers.{i}.weight" for i in layers}
    if set(tensors) != expected:
        raise RouterLoadError(
            f"routers in {path} cover layers {sorted(tensors)}; the model routes {sorted(expected)}"
        )
    for i, layer in layers.items():
        weight = tensors[f"layers.{i}.weight"]
        if tuple(weight.shape) != (1, hidden):
            raise RouterLoadError(
                f"router of layer {i} in {path} has shape {tuple(weight.shape)}, expected (1, {hidden})"
            )
        if not torch.isfinite(weight).all():
            raise RouterLoadError(f"router of layer {i} in {path} has non-finite weights")
        copy_into_parameter(layer.router.proj.weight, weight)
        layer.router.threshold = config.threshold_for(i)
    if current is not None:
        current.threshold = config.threshold
        current.layer_thresholds = config.layer_thresholds
    return model


def copy_adapter(source: str | Path, destination: str | Path) -> bool:
    """Copies the LoRA adapter of router folder ``source`` (if any) into ``destination``, each
    file atomically, so that routers saved elsewhere keep the adapter they were trained with.
    Returns whether there was one."""
    import shutil

    source, destination = Path(source), Path(destination)
    found = (source / ADAPTER_CONFIG).exists()
    if found and source.resolve() != destination.resolve():
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            with atomic_path(destination / name) as tmp:
                shutil.copyfile(source / name, tmp)
    return found


def merge_lora_adapter(model: nn.Module, path: str | Path) -> None:
    """Merges the LoRA adapter saved in ``path`` into ``model``'s weights (in place).

    Raises:
        RouterLoadError: the adapter's files are unreadable, or its tensors and the model's
            LoRA-wrapped modules do not match one to one.
    """
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = PeftConfig.from_pretrained(str(path))
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise RouterLoadError(f"LoRA adapter in {path} cannot be read: {exc}") from exc
    peft_model = PeftModel(model, config)
    result = set_peft_model_state_dict(peft_model, tensors)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        peft_model.unload()
        raise RouterLoadError(
            f"LoRA adapter in {path} does not match the model: "
            f"{len(result.unexpected_keys)} tensors without a module (e.g. {result.unexpected_keys[:2]}), "
            f"{len(missing)} modules without tensors (e.g. {missing[:2]})"
        )
    peft_model.merge_and_unload()


def copy_into_parameter(param: nn.Parameter, value: torch.Tensor) -> None:
    """``param[...] = value``, also when ``param`` is an FSDP2 ``DTensor`` (each process keeps its
    shard of ``value``, which every process must hold in full; no communication).

    Raises:
        ValueError: a ZeRO-3-partitioned parameter (the engine loads those from its checkpoint).
    """
    if hasattr(param, "ds_tensor"):
        raise ValueError("cannot write into a ZeRO-3-partitioned parameter outside DeepSpeed's checkpoint loading")
    with torch.no_grad():
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(
                value.to(dtype=param.dtype, device=param.device_mesh.device_type),
                param.device_mesh,
                param.placements,
                src_data_rank=None,
            )
            param.copy_(value)
        else:
            param.copy_(value.to(param))

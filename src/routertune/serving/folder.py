"""The served folder: what vLLM loads for a routed model.

    folder = prepare_served_folder("path/to/hf-model", "runs/routers", "served/my-model")
    # vllm serve served/my-model --worker-cls routertune.serving.vllm_worker.RoutedWorker

It holds links to the model's own files, a ``config.json`` whose ``architectures`` names the routed
class (``RoutertuneLlamaForCausalLM``) and whose ``routertune`` entry says where the routers are, and
the router files under ``routertune/``. Everything is checked here, before an engine starts: the
family is one we serve, the granularity is one we serve, the router files match the model's shape.
Needs no vLLM and no transformers (the frontend and the engine may run different versions).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from routertune.io_utils import atomic_dir
from routertune.serving.families import SERVED_GRANULARITIES, VLLM_FAMILIES, routed_architecture

ROUTER_CONFIG = "router_config.json"
ROUTER_WEIGHTS = "routers.safetensors"
ROUTERS_SUBDIR = "routertune"
CONFIG_KEY = "routertune"


class ServingError(ValueError):
    """A model or router folder that routertune cannot serve, named with the reason."""


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ServingError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ServingError(f"{config_file} is not valid JSON: {exc}") from exc


def served_family(config: dict[str, Any]) -> str:
    """The model's architecture if vLLM can serve it routed, else ServingError naming the choices."""
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in VLLM_FAMILIES:
        raise ServingError(
            f"routertune serves {', '.join(sorted(VLLM_FAMILIES))} in vLLM; this model's config names "
            f"{archs or 'no architecture'}"
        )
    return archs[0]


def load_router_folder(
    routers_dir: str | Path, config: dict[str, Any]
) -> tuple[dict[str, Any], dict[int, Any]]:
    """Reads a router folder and checks it against a model config.

    Returns:
        ``(meta, weights)``: the router_config.json content and layer -> ``(1, hidden)`` float32
        tensor.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    routers_dir = Path(routers_dir)
    config_file, weights_file = routers_dir / ROUTER_CONFIG, routers_dir / ROUTER_WEIGHTS
    if (routers_dir / "adapter_config.json").exists():
        # Serving these routers on the plain weights would silently drop the LoRA they were trained with.
        raise ServingError(
            f"{routers_dir} holds a LoRA adapter trained with its routers, which serving does not apply: "
            "merge it into the model (PeftModel.from_pretrained(model, folder).merge_and_unload(), "
            "save_pretrained) and serve the merged model with a copy of the folder without the adapter files"
        )
    for f in (config_file, weights_file):
        if not f.is_file():
            raise ServingError(f"{f} is missing (a router folder holds {ROUTER_CONFIG} and {ROUTER_WEIGHTS})")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ServingError(f"{config_file} is not valid JSON: {exc}") from exc
    rc = meta.get("router_config")
    if not isinstance(rc, dict) or "routed_layers" not in meta:
        raise ServingError(f"{config_file} lacks router_config or routed_layers")
    granularity = rc.get("granularity")
    if granularity not in SERVED_GRANULARITIES:
        raise ServingError(
            f"routers in {routers_dir} use granularity {granularity!r}; vLLM serving supports "
            f"{', '.join(SERVED_GRANULARITIES)} (one route per request, decided on its prompt)"
        )
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    if meta.get("hidden_size") != hidden or meta.get("num_hidden_layers") != layers:
        raise ServingError(
            f"routers in {routers_dir} were saved for a model with hidden_size={meta.get('hidden_size')} "
            f"and {meta.get('num_hidden_layers')} layers (base model {meta.get('base_model')!r}); this "
            f"model has hidden_size={hidden} and {layers} layers"
        )
    if meta.get("model_type") not in (None, config.get("model_type")):
        raise ServingError(
            f"routers in {routers_dir} were saved for model_type {meta['model_type']!r}; this model is "
            f"{config.get('model_type')!r}"
        )
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ServingError(f"{weights_file} is corrupt or unreadable: {exc}") from exc
    routed = [int(i) for i in meta["routed_layers"]]
    expected = {f"layers.{i}.weight" for i in routed}
    if set(tensors) != expected:
        raise ServingError(f"{weights_file} covers {sorted(tensors)}; its config routes layers {routed}")
    weights = {}
    for i in routed:
        if not 0 < i < layers:
            raise ServingError(
                f"routers in {routers_dir} route layer {i}; the model has layers 0..{layers - 1}"
            )
        w = tensors[f"layers.{i}.weight"].float()
        if tuple(w.shape) != (1, hidden):
            raise ServingError(f"router of layer {i} has shape {tuple(w.shape)}, expected (1, {hidden})")
        if not bool(w.isfinite().all()):
            raise ServingError(f"router of layer {i} in {weights_file} has non-finite weights")
        weights[i] = w
    return meta, weights


def layer_thresholds(meta: dict[str, Any]) -> dict[int, float]:
    """Each routed layer's threshold: the config's ``threshold`` unless ``layer_thresholds`` sets it
    (the rule of ``RouterConfig.threshold_for``)."""
    rc = meta["router_config"]
    default = float(rc.get("threshold", 0.5))
    overrides = {int(k): float(v) for k, v in (rc.get("layer_thresholds") or {}).items()}
    out = {}
    for i in (int(j) for j in meta["routed_layers"]):
        t = overrides.get(i, default)
        if not math.isfinite(t) or t < 0:
            raise ServingError(f"threshold {t} of layer {i} is not a number >= 0")
        out[i] = t
    return out


def prepare_served_folder(model_dir: str | Path, routers_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes the served folder (see the module docstring) to ``out_dir``, replacing it whole.

    Raises:
        ServingError: the model's family or the routers' granularity is not served, or the router
            files do not match the model.
    """
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir)
    config = read_model_config(model_dir)
    if CONFIG_KEY in config:
        raise ServingError(f"{model_dir} is already a served folder; pass the original model folder")
    family = served_family(config)
    load_router_folder(routers_dir, config)  # refuse before writing anything
    with atomic_dir(out_dir) as tmp:
        for entry in model_dir.iterdir():
            if entry.name != "config.json":
                os.symlink(entry, tmp / entry.name)
        (tmp / ROUTERS_SUBDIR).mkdir()
        for name in (ROUTER_CONFIG, ROUTER_WEIGHTS):
            shutil.copyfile(Path(routers_dir) / name, tmp / ROUTERS_SUBDIR / name)
        served = dict(config)
        served["architectures"] = [routed_architecture(family)]
        served[CONFIG_KEY] = {
            "routers": ROUTERS_SUBDIR,
            "base_architecture": family,
            "base_model": str(model_dir),
        }
        (tmp / "config.json").write_text(json.dumps(served, indent=2, sort_keys=True) + "\n")
    return out_dir

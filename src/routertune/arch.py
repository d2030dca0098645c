"""Everything that differs between supported architectures, in one table.

A routed decoder layer needs the pre-norm residual layout shared by Llama-family models:
``input_layernorm -> self_attn -> residual -> post_attention_layernorm -> mlp -> residual``.
Token-granularity attention additionally computes queries for kept tokens only, which needs
the attention module's parts (q/k/v/o projections, rotary layout, sliding window).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

REQUIRED_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


class UnsupportedArchitectureError(ValueError):
    """The model's decoder layers do not have the structure routers need."""


def _no_sliding_window(attn: nn.Module) -> int | None:
    return None


def _config_sliding_window(attn: nn.Module) -> int | None:
    return getattr(attn.config, "sliding_window", None)


def _layer_sliding_window(attn: nn.Module) -> int | None:
    # Qwen2 sets the window per layer (None on full-attention layers).
    return getattr(attn, "sliding_window", None)


@dataclass(frozen=True)
class ArchSpec:
    """Per-architecture facts.

    Attributes:
        name: model_type.
        sliding_window: attention module -> window passed to the attention kernel (or None).
        rotary: rotary layout of q/k; "half" = rotate_half on the last dim (Llama style).
        qk_norm: whether q/k go through per-head norms (``q_norm``/``k_norm``) before rotary.
        kept_query_attention: whether token-level attention may compute queries for kept
            tokens only (needs the parts above). False falls back to computing all queries
            and discarding the skipped ones (correct, slower).
    """

    name: str
    sliding_window: Callable[[nn.Module], int | None] = _no_sliding_window
    rotary: str = "half"
    qk_norm: bool = False
    kept_query_attention: bool = True


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama"),
    "mistral": ArchSpec("mistral", sliding_window=_config_sliding_window),
    "qwen2": ArchSpec("qwen2", sliding_window=_layer_sliding_window),
    "qwen3": ArchSpec("qwen3", sliding_window=_layer_sliding_window, qk_norm=True),
}

# Layers with the four parts but an unknown attention: route them, but token-level attention
# computes every query (we cannot vouch for their rotary layout).
GENERIC = ArchSpec("generic", kept_query_attention=False)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``*ForCausalLM`` (or of its base model)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: cannot find decoder layers (expected model.model.layers); "
            "routertune supports decoder-only Llama/Mistral/Qwen2-style models"
        )
    return layers


def base_model(model: nn.Module) -> nn.Module:
    """The module whose forward receives the 2-D attention mask and runs the layers."""
    return getattr(model, "model", model)


def arch_spec(model: nn.Module) -> ArchSpec:
    """Checks every decoder layer and returns the architecture's facts.

    Raises:
        UnsupportedArchitectureError: naming the layer class and what it lacks.
    """
    for layer in decoder_layers(model):
        missing = [p for p in REQUIRED_LAYER_PARTS if not hasattr(layer, p)]
        if missing:
            raise UnsupportedArchitectureError(
                f"decoder layer class {type(layer).__name__} lacks {', '.join(missing)}; routertune routes "
                f"pre-norm layers with {', '.join(REQUIRED_LAYER_PARTS)} (Llama, Mistral, Qwen2 and kin)"
            )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is not None:
        return spec
    attn = decoder_layers(model)[0].self_attn
    if all(hasattr(attn, p) for p in ATTENTION_PARTS) and hasattr(attn, "head_dim"):
        return ArchSpec(
            model_type or "generic", sliding_window=_layer_sliding_window, kept_query_attention=False
        )
    return GENERIC


def mask_anchor_layers(model: nn.Module) -> set[int]:
    """Layers whose KV cache sizes the attention masks; they must always write KV.

    transformers builds one mask per attention type per forward, sized from the cache of the
    first layer of that type (layer 0, or the first sliding-window layer). If such a layer
    skipped attention its cache would stay empty and every mask would be mis-sized.
    """
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if not layer_types:
        return {0}
    anchors = {0}
    for kind in set(layer_types):
        anchors.add(list(layer_types).index(kind))
    return anchors

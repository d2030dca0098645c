"""Everything that differs between decoder families, in one table.

Routing runs the model's own decoder-layer code and wraps its sub-layer modules (see
:mod:`routertune.routing.layers`); what a wrapper must know about a family is written here and nowhere
else:

* where the decoder layers and their attention / MLP modules live;
* where each residual branch ends: Gemma 2/3 and OLMo2 normalise a branch's output
  (``post_attention_layernorm(attn(x))``) before adding it, and an RMSNorm is blind to a scalar
  gate in front of it, so in training the straight-through gate is applied after that norm;
* what token-level attention needs to compute queries for kept tokens only (separate q/k/v/o
  projections, q/k norms, extra kernel arguments); families without it compute every query and
  zero the skipped ones (exact, no saving in the kernel);
* the mask-anchor layers, which must always write KV.

A family that is not in the table is routed through the same wrappers with discovered module
names and no kept-query attention; the probe run at attach time (:mod:`routertune.routing.probe`) then
either finds it exact or refuses it by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

# Names under which transformers keeps these parts, most common first.
LAYER_LIST_NAMES = ("layers", "h", "blocks")
ATTENTION_NAMES = ("self_attn", "attention", "self_attention", "attn")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
# Keyword under which a decoder layer / its attention receives the KV cache.
CACHE_KWARGS = ("cache", "past_key_values", "layer_past")
KEPT_QUERY_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


class UnsupportedArchitectureError(ValueError):
    """The model's decoder layers cannot be routed exactly."""


def _no_kernel_kwargs(attn: nn.Module) -> dict:
    return {}


def _attribute_window(attn: nn.Module) -> dict:
    # Qwen2, Gemma 2/3 set the window per layer (None on full-attention layers).
    return {"sliding_window": getattr(attn, "sliding_window", None)}


def _config_window(attn: nn.Module) -> dict:
    return {"sliding_window": getattr(attn.config, "sliding_window", None)}


def _gemma2_kernel(attn: nn.Module) -> dict:
    return {**_attribute_window(attn), "softcap": attn.attn_logit_softcapping}


@dataclass(frozen=True)
class ArchSpec:
    """Per-family facts.

    Attributes:
        name: model_type.
        attention, mlp: attribute names of the sub-layers on a decoder layer.
        branch_end: sub-layer -> name of the decoder layer's module that the sub-layer's output
            goes through before the residual add (a post-norm); the training gate sits after it.
        kept_queries: token-level attention may compute queries for kept tokens only (needs
            ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``head_dim``, ``scaling`` and the
            family's own ``apply_rotary_pos_emb``); False computes every query.
        qk_norm: ``"head"`` (``q_norm``/``k_norm`` over each head, before rotary), ``"full"``
            (over the whole projection, before the head split: OLMo2) or None.
        kernel_kwargs: attention module -> extra arguments the family passes to its kernel.
        branch_scale: attribute of the decoder layer that multiplies every branch before the
            residual add (Granite's ``residual_multiplier``), or None; skipping is blind to it
            (zero times anything), importance measures (:mod:`routertune.baselines`) are not.
        known: whether the family was written into this table (else discovered).
    """

    name: str
    attention: str = "self_attn"
    mlp: str = "mlp"
    branch_end: dict[str, str] = field(default_factory=dict)
    kept_queries: bool = True
    qk_norm: str | None = None
    kernel_kwargs: Callable[[nn.Module], dict] = _no_kernel_kwargs
    branch_scale: str | None = None
    known: bool = True


_POST_NORMS = {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("llama"),
        ArchSpec("mistral", kernel_kwargs=_config_window),
        ArchSpec("qwen2", kernel_kwargs=_attribute_window),
        ArchSpec("qwen3", kernel_kwargs=_attribute_window, qk_norm="head"),
        ArchSpec("granite", branch_scale="residual_multiplier"),
        ArchSpec("gemma2", branch_end=_POST_NORMS, kernel_kwargs=_gemma2_kernel),
        ArchSpec("gemma3_text", branch_end=_POST_NORMS, kernel_kwargs=_attribute_window, qk_norm="head"),
        ArchSpec("olmo2", branch_end=_POST_NORMS, qk_norm="full"),
        ArchSpec("olmo3", branch_end=_POST_NORMS, kernel_kwargs=_attribute_window, qk_norm="full"),
        ArchSpec("cohere", qk_norm="head"),  # parallel attention + MLP; q/k norms when use_qk_norm
        ArchSpec("phi3", kept_queries=False),  # fused qkv_proj
        ArchSpec("gpt_neox", attention="attention", kept_queries=False),  # fused, per-head interleaved qkv
    )
}


def _first_attr(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def base_model(model: nn.Module) -> nn.Module:
    """The module whose forward receives the 2-D attention mask and runs the decoder layers."""
    inner = getattr(model, "base_model", None)
    if isinstance(inner, nn.Module) and inner is not model:
        return inner
    return getattr(model, "model", model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``*ForCausalLM`` (or of its base model)."""
    base = base_model(model)
    for name in LAYER_LIST_NAMES:
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise UnsupportedArchitectureError(
        f"{type(model).__name__}: cannot find its decoder layers (looked for {', '.join(LAYER_LIST_NAMES)} "
        f"on {type(base).__name__}); routertune routes decoder-only transformers models"
    )


def arch_spec(model: nn.Module) -> ArchSpec:
    """The family's facts: from the table, or discovered for a family it does not list.

    Raises:
        UnsupportedArchitectureError: naming the layer class and the part it lacks.
    """
    layers = decoder_layers(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        first = layers[0]
        attention, mlp = _first_attr(first, ATTENTION_NAMES), _first_attr(first, MLP_NAMES)
        if attention is None or mlp is None:
            raise UnsupportedArchitectureError(
                f"decoder layer class {type(first).__name__} ({model_type}) has no attention "
                f"({'/'.join(ATTENTION_NAMES)}) or MLP ({'/'.join(MLP_NAMES)}) sub-module to route"
            )
        spec = ArchSpec(
            model_type or "unknown", attention=attention, mlp=mlp, kept_queries=False, known=False
        )
    for layer in layers:
        for part in (spec.attention, spec.mlp, *spec.branch_end.values()):
            if not isinstance(getattr(layer, part, None), nn.Module):
                raise UnsupportedArchitectureError(
                    f"decoder layer class {type(layer).__name__} ({spec.name}) lacks the sub-module {part!r}"
                )
    return spec


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

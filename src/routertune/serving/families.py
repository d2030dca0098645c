"""The families routertune serves in vLLM: one row per Hugging Face architecture.

Each row names vLLM's own model class, which the routed class subclasses (its forward, its weight
loading and its layers are vLLM's). Every row's decoder layers sit at ``model.layers`` and call
``self_attn(positions=..., hidden_states=...)`` on the input-layernormed hidden state, the quantity
routertune's routers score; a family whose vLLM class differs gets its own row, not a branch.
"""

from __future__ import annotations

# HF architecture (config.json "architectures") -> (vLLM module, vLLM class).
VLLM_FAMILIES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
}

# The granularities a served model may use. attn_sequence is the paper's MindSkip: one decision
# per request and layer, made on its prompt and held for every decode step, so a skipped layer
# never needs the request's KV. Token-level and MLP/block routes are not served (yet).
SERVED_GRANULARITIES = ("attn_sequence",)

ARCH_PREFIX = "Routertune"


def routed_architecture(hf_architecture: str) -> str:
    """The architecture name a served folder's config.json carries."""
    return ARCH_PREFIX + hf_architecture


def base_architecture(routed: str) -> str:
    if not routed.startswith(ARCH_PREFIX):
        raise ValueError(f"{routed!r} is not a routertune architecture")
    return routed[len(ARCH_PREFIX) :]

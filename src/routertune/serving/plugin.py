"""vLLM plugin (entry point group ``vllm.general_plugins``): registers the routed architectures.

vLLM loads general plugins in every process it starts, so a served folder whose config.json names
``RoutertuneLlamaForCausalLM`` resolves to our class in the engine and in its workers. The model
classes are imported lazily by vLLM's registry ("module:Class"), not here.
"""

from __future__ import annotations

# vLLM releases this integration was written and tested against: the routed model reads the v1
# model runner's input batch and slices the CPU attention backend's metadata, both internal.
SUPPORTED_VLLM = ("0.32.",)


def check_vllm_version(version: str) -> None:
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"routertune's vLLM serving supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; "
            f"this environment has vLLM {version} (install with scripts/install_serve.sh)"
        )


def register() -> None:
    from vllm import ModelRegistry

    from routertune.serving.families import VLLM_FAMILIES, routed_architecture

    # Registered on any vLLM, so that the routed model's construction (check_vllm_version) fails
    # with our message rather than vLLM's "architecture not supported"; plain models are untouched.
    for arch in VLLM_FAMILIES:
        name = routed_architecture(arch)
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"routertune.serving.vllm_model:{name}")

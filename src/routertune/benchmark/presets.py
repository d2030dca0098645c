"""Random models of real shapes (``--model random:<preset>``), and loading a benchmark model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from routertune.benchmark.settings import BenchError

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class Preset:
    """A model shape built with random weights (``--model random:<name>``)."""

    arch: str  # llama, mistral or qwen2
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool
    note: str
    head_dim: int | None = None
    sliding_window: int | None = None

    def num_parameters(self) -> int:
        d = self.head_dim or self.hidden // self.heads
        attn = self.hidden * d * (2 * self.heads + 2 * self.kv_heads)
        if self.arch == "qwen2":  # q/k/v biases
            attn += d * (self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        embed = self.vocab * self.hidden * (1 if self.tie else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + embed + self.hidden


PRESETS: dict[str, Preset] = {
    "llama-tiny": Preset("llama", 64, 4, 4, 2, 128, 256, False, "4-layer toy for tests (milliseconds)"),
    "smollm2-135m": Preset(
        "llama", 576, 30, 9, 3, 1536, 49152, True, "SmolLM2-135M shape (the default model's shape)", head_dim=64
    ),
    "qwen2-0.5b": Preset("qwen2", 896, 24, 14, 2, 4864, 151936, True, "Qwen2.5-0.5B shape"),
    "llama-1b": Preset("llama", 2048, 16, 32, 8, 8192, 128256, True, "Llama-3.2-1B shape (5 GB in float32)"),
    "tinyllama-1.1b": Preset("llama", 2048, 22, 32, 4, 5632, 32000, False, "TinyLlama-1.1B shape (4.4 GB fp32)"),
    "mistral-7b": Preset(
        "mistral", 4096, 32, 32, 8, 14336, 32000, False, "Mistral-7B shape (GPU: 14.5 GB bf16)", sliding_window=4096
    ),
    "llama-3-8b": Preset("llama", 4096, 32, 32, 8, 14336, 128256, False, "Llama-3-8B shape (GPU: 16 GB bf16)"),
}


def preset_config(preset: Preset) -> Any:
    """The transformers config of a preset (sdpa attention)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        vocab_size=preset.vocab,
        tie_word_embeddings=preset.tie,
        max_position_embeddings=32768,
        attn_implementation="sdpa",
    )
    if preset.arch == "llama":
        return LlamaConfig(head_dim=preset.head_dim or preset.hidden // preset.heads, **common)
    if preset.arch == "mistral":
        return MistralConfig(sliding_window=preset.sliding_window, **common)
    if preset.arch == "qwen2":
        return Qwen2Config(**common)
    raise BenchError(f"preset architecture {preset.arch!r} is not buildable")


def build_random_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A model of preset ``name`` (with or without the ``random:`` prefix) with random weights.

    Raises:
        BenchError: unknown preset, or (on CPU) not enough free memory for its weights.
    """
    from transformers import AutoModelForCausalLM

    key = name.removeprefix(RANDOM_PREFIX)
    if key not in PRESETS:
        raise BenchError(f"unknown preset {name!r}; presets: {', '.join(RANDOM_PREFIX + k for k in PRESETS)}")
    preset = PRESETS[key]
    need = preset.num_parameters() * torch.empty((), dtype=dtype).element_size()
    free = available_memory_bytes()
    if torch.device(device).type == "cpu" and free is not None and need > 0.85 * free:
        raise BenchError(
            f"preset {key!r} needs about {need / 2**30:.1f} GiB for its {str(dtype).removeprefix('torch.')} weights; "
            f"this machine has {free / 2**30:.1f} GiB available (try a smaller preset, or --dtype bf16)"
        )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(preset_config(preset), dtype=dtype)
    model.config._name_or_path = RANDOM_PREFIX + key
    return model.eval()


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def load_bench_model(
    name: str,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
):
    """``random:<preset>`` or anything ``routertune.loading`` resolves; returns ``(model, display name)``.
    ``attn_implementation`` picks the attention kernel (None: sdpa)."""
    from routertune.loading import load_model_and_tokenizer, parse_dtype

    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name.startswith(RANDOM_PREFIX):
        model = build_random_model(name, device, torch_dtype, seed)
        if attn_implementation is not None:
            try:
                model.set_attn_implementation(attn_implementation)
            except ImportError as err:
                raise ValueError(f"attention kernel {attn_implementation!r}: {err}") from err
        return model, name
    model, _ = load_model_and_tokenizer(
        name, dtype=torch_dtype, device=device, progress=False, attn_implementation=attn_implementation
    )
    return model, model.config._name_or_path

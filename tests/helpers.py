"""Test helpers: tiny random models, a byte-level chat tokenizer, references with sub-layers deleted."""

from __future__ import annotations

import copy

import torch
from torch import nn

from routertune.model import routed_layers

VOCAB = 96

BYTE_SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_tokenizer(tokens: list[str], merges: list[tuple[str, str]] = (), **special_tokens):
    """A fast byte-level BPE tokenizer over ``tokens`` (id = position) with ``merges`` and the
    ChatML-style template; ``special_tokens`` (pad_token=..., model_max_length=...) go to
    ``PreTrainedTokenizerFast``. Builds in milliseconds, no files."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def byte_chat_tokenizer(model_max_length: int = 1024, padding_side: str = "right"):
    """Every byte is a token (no merges; 259 ids); ids 0-2 are pad / bos / eos; a ChatML-style
    template."""
    from tokenizers import pre_tokenizers

    tokenizer = byte_level_tokenizer(
        BYTE_SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()),
        pad_token="<|pad|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        model_max_length=model_max_length,
    )
    tokenizer.padding_side = padding_side
    return tokenizer


def tiny_model(arch: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """A 4-layer, hidden-64 random model of the given architecture, in eval mode."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "mistral":
        # A window shorter than the test sequences, so the sliding mask really matters.
        model = MistralForCausalLM(MistralConfig(sliding_window=6, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ("llama", "mistral", "qwen2")


class ZeroAttention(nn.Module):
    """Stands in for a deleted attention sub-layer: adds nothing, stores no KV."""

    def forward(self, hidden_states, **kwargs):
        return torch.zeros_like(hidden_states), None


class ZeroMLP(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def without_sublayers(model: nn.Module, layer_ids, target: str) -> nn.Module:
    """A copy of the plain model with the target sub-layers of ``layer_ids`` deleted."""
    ref = copy.deepcopy(model)
    for i in layer_ids:
        layer = ref.model.layers[i]
        if target in ("attn", "block"):
            layer.self_attn = ZeroAttention()
        if target in ("mlp", "block"):
            layer.mlp = ZeroMLP()
    return ref


def randomize_routers(model: nn.Module, seed: int = 0, scale: float = 2.0) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in routed_layers(model).values():
        w = layer.router.proj.weight
        with torch.no_grad():
            w.copy_(torch.randn(w.shape, generator=g) * scale)


def left_padded_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    seqs = []
    for b, n in enumerate(lengths):
        seq = torch.randint(3, VOCAB, (n,), generator=g)
        seqs.append(seq)
        ids[b, T - n :] = seq
        mask[b, T - n :] = 1
    return ids, mask, seqs

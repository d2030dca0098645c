"""Test helpers: tiny random models, a byte-level chat tokenizer, references with sub-layers deleted."""

from __future__ import annotations

import copy

import torch
from torch import nn

from routertune.routing.attach import routed_layers, set_thresholds

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


def _family_configs(common: dict) -> dict:
    """Tiny random configs per decoder family (hidden 64, 4 layers), as transformers' tests build them."""
    import transformers as T

    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**common, **heads)),
        # A window shorter than the test sequences, so the sliding mask really matters.
        "mistral": (T.MistralForCausalLM, T.MistralConfig(sliding_window=6, **common, **heads)),
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**common, **heads)),
        "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config(head_dim=16, **common, **heads)),
        # Gemma 2/3: post-norms on both branches, alternating sliding / full layers (window 6)
        "gemma2": (
            T.Gemma2ForCausalLM,
            T.Gemma2Config(
                head_dim=16, sliding_window=6, **{**common, "attn_implementation": "eager"}, **heads
            ),
        ),
        "gemma3": (
            T.Gemma3ForCausalLM,
            T.Gemma3TextConfig(
                head_dim=16,
                sliding_window=6,
                layer_types=["sliding_attention", "full_attention"] * 2,
                **common,
                **heads,
            ),
        ),
        # Granite: residual, embedding, attention multipliers and logits scaling away from 1
        "granite": (
            T.GraniteForCausalLM,
            T.GraniteConfig(
                residual_multiplier=0.4,
                embedding_multiplier=3.0,
                attention_multiplier=0.2,
                logits_scaling=2.0,
                **common,
                **heads,
            ),
        ),
        "olmo2": (T.Olmo2ForCausalLM, T.Olmo2Config(**common, **heads)),
        "phi3": (T.Phi3ForCausalLM, T.Phi3Config(**common, **heads)),
        # GPT-NeoX: parallel residual, partial rotary, fused interleaved qkv
        "gpt_neox": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig(rotary_pct=0.5, num_attention_heads=4, **common)),
        # Cohere: attention and MLP in parallel from one LayerNorm, interleaved rotary, q/k norms
        "cohere": (T.CohereForCausalLM, T.CohereConfig(use_qk_norm=True, **common, **heads)),
    }


def tiny_model(arch: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """A 4-layer, hidden-64 random model of the given family, in eval mode."""
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation=attn_implementation,
    )
    families = _family_configs(common)
    if arch not in families:
        raise ValueError(arch)
    cls, config = families[arch]
    torch.manual_seed(seed)
    return cls(config).eval()


# The families of the original three-family tests; FAMILIES is every family routertune supports.
ARCHS = ("llama", "mistral", "qwen2")
FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "granite",
    "olmo2",
    "phi3",
    "gpt_neox",
    "cohere",
)


class ZeroAttention(nn.Module):
    """Stands in for a deleted attention sub-layer: adds nothing, stores no KV."""

    def forward(self, hidden_states, **kwargs):
        return torch.zeros_like(hidden_states), None


class ZeroMLP(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def without_sublayers(model: nn.Module, layer_ids, target: str) -> nn.Module:
    """A copy of the plain model with the target sub-layers of ``layer_ids`` deleted."""
    from oracle import layout, plain_layers

    ref = copy.deepcopy(model)
    _, _, attn, mlp = layout(ref)
    for i in layer_ids:
        layer = plain_layers(ref)[i]
        if target in ("attn", "block"):
            setattr(layer, attn, ZeroAttention())
        if target in ("mlp", "block"):
            setattr(layer, mlp, ZeroMLP())
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


def greedy(model, ids, mask=None, n=6, **kw):
    """Greedy generate() of exactly ``n`` tokens, with the per-step logits and the cache."""
    out = model.generate(
        ids,
        attention_mask=mask if mask is not None else torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
        **kw,
    )
    return out


def router_weights(model) -> dict[int, tuple[torch.Tensor, float]]:
    """Layer index -> (router weight, threshold) of a routed model."""
    return {
        i: (u.router.proj.weight.detach().clone(), u.router.threshold)
        for i, u in routed_layers(model).items()
    }


def hand_route(model, plain, granularity, ids, mask=None, median=False):
    """The oracle's logits and decisions for ``model``'s routers; with ``median`` the thresholds
    are first set near each layer's median hand-computed score (mixed decisions)."""
    weights = {i: (w, None if median else t) for i, (w, t) in router_weights(model).items()}
    from oracle import hand_routed_logits

    logits, decisions, thresholds = hand_routed_logits(plain, weights, granularity, ids, mask)
    if median:
        set_thresholds(model, thresholds)
    return logits, decisions


def mixed_rows_model(family, granularity, ids, mask, seed=14, router_layers=3):
    """A routed copy of a tiny ``family`` model whose thresholds split every routed layer's
    units on ``ids`` (mixed decisions)."""
    from routertune import RouterConfig, attach_routers

    plain = tiny_model(family)
    model = copy.deepcopy(plain)
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=router_layers))
    randomize_routers(model, seed=seed)
    hand_route(model, plain, granularity, ids, mask, median=True)
    return model


def free_port() -> int:
    """A TCP port free on the loopback address now (for a launched process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Counting the work of a decoder-only forward: what a router may skip and what it cannot.

The ideal speedup of a routed model is ``FLOPs(dense) / FLOPs(routed)``, counted over the parts
whose cost grows with the model: the q/k/v/o projections, the attention scores and weighted
values at the actual key length, the gated MLP (gate, up, down), the routers, and the lm_head.
Multiply-adds count 2 FLOPs. Norms, rotary, softmax, residual adds and the embedding lookup are
left out: they are a few FLOPs per hidden unit, well under 1% at any size timed here.

    from routertune.benchmark.flops import ModelShape, phase_flops, routed_work
    shape = ModelShape.from_config(model.config)
    dense = phase_flops(shape, "prefill", context=512, batch=8)
    routed = phase_flops(shape, "prefill", 512, 8, works={i: routed_work("attn_sequence", 0.0) for i in (20, 21)})
    ideal = dense.total / routed.total

Causal attention counts only the (query, key) pairs a query may see (the lower triangle, cut at
the sliding window); ``causal=False`` counts the full rectangle, which is what kernels that do
not skip masked blocks (and ``torch.utils.flop_counter``) count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Any

PARTS = ("q_o", "kv", "core", "mlp", "router", "lm_head")


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set a Llama-family decoder's FLOPs.

    Attributes:
        hidden: model width C.
        heads: query heads H.
        kv_heads: key/value heads (GQA).
        head_dim: D.
        intermediate: MLP width (gated MLP: three C x I matrices).
        vocab: lm_head rows.
        num_layers: decoder layers.
        windows: per layer, the sliding attention window or None (full attention).
    """

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    num_layers: int
    windows: tuple[int | None, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.windows:
            object.__setattr__(self, "windows", (None,) * self.num_layers)
        if len(self.windows) != self.num_layers:
            raise ValueError(f"windows has {len(self.windows)} entries for {self.num_layers} layers")

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Reads a transformers Llama/Mistral/Qwen2-style config.

        Sliding windows: Qwen2-style ``layer_types`` name the sliding layers; otherwise a set
        ``sliding_window`` applies to every layer (Mistral).
        """
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        n = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window is None:
            windows: tuple[int | None, ...] = (None,) * n
        elif layer_types:
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types[:n])
        else:
            windows = (window,) * n
        return cls(
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            num_layers=n,
            windows=windows,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "hidden": self.hidden,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate": self.intermediate,
            "vocab": self.vocab,
            "num_layers": self.num_layers,
            "windows": list(self.windows),
        }


@dataclass(frozen=True)
class LayerWork:
    """Share of each part of one decoder layer that runs (1 = every row/token, 0 = none).

    Attributes:
        q_o: query and output projections.
        kv: key and value projections (token routing still runs them for every token).
        core: attention scores and weighted values.
        mlp: the gated MLP.
        router: ``"sequence"``, ``"token"`` or None: the router's own cost.
    """

    q_o: float = 1.0
    kv: float = 1.0
    core: float = 1.0
    mlp: float = 1.0
    router: str | None = None


DENSE = LayerWork()


def routed_work(granularity: str, capacity: float) -> LayerWork:
    """What a routed layer computes when it keeps a share ``capacity`` of its units.

    ``*_sequence``: skipped rows run nothing of the target. ``*_token``: skipped tokens still get
    keys and values (later tokens attend to them), so only queries, the attention kernel, the
    output projection (and the MLP for ``mlp``/``block``) shrink. For tokens the attention
    pairs are taken to shrink with the kept share, exact when a layer keeps all or none.
    """
    if not 0.0 <= capacity <= 1.0:
        raise ValueError(f"capacity must be in [0, 1]; got {capacity}")
    target, unit = granularity.split("_", 1)
    if unit not in ("sequence", "token") or target not in ("attn", "mlp", "block"):
        raise ValueError(f"unknown granularity {granularity!r}")
    c = capacity
    kv = c if unit == "sequence" else 1.0
    if target == "attn":
        return LayerWork(q_o=c, kv=kv, core=c, mlp=1.0, router=unit)
    if target == "mlp":
        return LayerWork(mlp=c, router=unit)
    return LayerWork(q_o=c, kv=kv, core=c, mlp=c, router=unit)


def deleted_work(target: str) -> LayerWork:
    """A layer whose ``attn``, ``mlp`` or ``block`` sub-layers are deleted (no router)."""
    if target == "attn":
        return LayerWork(q_o=0.0, kv=0.0, core=0.0)
    if target == "mlp":
        return LayerWork(mlp=0.0)
    if target == "block":
        return LayerWork(q_o=0.0, kv=0.0, core=0.0, mlp=0.0)
    raise ValueError(f"unknown target {target!r}; use attn, mlp or block")


def attention_pairs(new_tokens: int, past: int, window: int | None = None, causal: bool = True) -> int:
    """(query, key) pairs of one row: ``new_tokens`` queries after ``past`` cached tokens.

    Causal: query i (1-based) sees ``past + i`` keys, at most ``window``. Otherwise every query
    is counted against every key (``new_tokens * (past + new_tokens)``).
    """
    if new_tokens < 0 or past < 0:
        raise ValueError(f"new_tokens and past must be >= 0; got {new_tokens}, {past}")
    total = past + new_tokens
    if not causal:
        return new_tokens * total
    if window is None or window >= total:
        return new_tokens * past + new_tokens * (new_tokens + 1) // 2
    # Queries whose visible prefix is shorter than the window see it whole; the rest see window keys.
    short = max(0, min(new_tokens, window - past))  # queries i with past + i <= window
    return short * past + short * (short + 1) // 2 + (new_tokens - short) * window


@dataclass
class Flops:
    """FLOPs of some forwards, by part (see ``PARTS``)."""

    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def add(self, other: Flops) -> Flops:
        for k, v in other.parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v
        return self

    def to_dict(self) -> dict[str, float]:
        return {"total": self.total, **self.parts}


def layer_flops(
    shape: ModelShape,
    layer_idx: int,
    new_tokens: int,
    past: int,
    work: LayerWork = DENSE,
    causal: bool = True,
) -> Flops:
    """FLOPs of one decoder layer for one row of ``new_tokens`` tokens after ``past`` cached."""
    C, H, Hkv, D = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim
    n = new_tokens
    pairs = attention_pairs(n, past, shape.windows[layer_idx], causal)
    parts = dict.fromkeys(PARTS, 0.0)
    parts["q_o"] = work.q_o * 2 * (2 * n * C * H * D)  # q: C -> H*D, o: H*D -> C
    parts["kv"] = work.kv * 2 * (2 * n * C * Hkv * D)  # k and v: C -> Hkv*D
    parts["core"] = work.core * 2 * (2 * H * D * pairs)  # q.k^T and attn @ v
    parts["mlp"] = work.mlp * 3 * (2 * n * C * shape.intermediate)  # gate, up, down
    if work.router == "sequence" and past == 0:
        # Decided once per request, at prefill (decode steps reuse the route): a masked mean
        # over the tokens, then one dot product.
        parts["router"] = n * C + 2 * C
    elif work.router == "token":
        parts["router"] = n * 2 * C
    return Flops(parts)


def forward_flops(
    shape: ModelShape,
    new_tokens: int,
    past: int,
    batch: int = 1,
    works: Mapping[int, LayerWork] | None = None,
    logits: int = 1,
    causal: bool = True,
) -> Flops:
    """FLOPs of one forward of ``batch`` rows, ``new_tokens`` each, after ``past`` cached tokens.

    Args:
        works: layer index -> its LayerWork; layers not named run densely.
        logits: positions per row that go through the lm_head (1 for generation, which keeps
            only the last position's logits).
    """
    works = works or {}
    bad = [i for i in works if not 0 <= i < shape.num_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist in a model with {shape.num_layers} layers")
    out = Flops()
    for i in range(shape.num_layers):
        out.add(layer_flops(shape, i, new_tokens, past, works.get(i, DENSE), causal))
    out.parts["lm_head"] = 2.0 * logits * shape.hidden * shape.vocab
    for k in out.parts:
        out.parts[k] *= batch
    return out


def phase_flops(
    shape: ModelShape,
    phase: str,
    context: int,
    batch: int = 1,
    works: Mapping[int, LayerWork] | None = None,
    new_tokens: int = 1,
    causal: bool = True,
) -> Flops:
    """FLOPs of a generation phase.

    ``prefill``: one forward over ``context`` tokens (logits of the last position only).
    ``decode``: ``new_tokens`` single-token forwards after the prompt, the key length growing
    from ``context + 1`` to ``context + new_tokens``.
    """
    if phase == "prefill":
        return forward_flops(shape, context, 0, batch, works, logits=1, causal=causal)
    if phase == "decode":
        total = Flops()
        for step in range(new_tokens):
            total.add(forward_flops(shape, 1, context + step, batch, works, logits=1, causal=causal))
        return total
    raise ValueError(f"phase must be 'prefill' or 'decode'; got {phase!r}")


def routed_works(
    granularity: str, capacities: Mapping[int, float], scored: Container[int] | None = None
) -> dict[int, LayerWork]:
    """Per-layer work of a routed model from its observed per-layer capacities.

    Args:
        scored: layers whose router really scores; a threshold of 0 or above 1 decides without
            scoring (no router FLOPs). None = every routed layer scores.
    """
    works = {}
    for i, c in capacities.items():
        work = routed_work(granularity, float(c))
        if scored is not None and int(i) not in scored:
            work = dataclasses.replace(work, router=None)
        works[int(i)] = work
    return works


def deleted_works(target: str, layers: list[int] | set[int]) -> dict[int, LayerWork]:
    """Per-layer work of the model with the ``target`` sub-layers of ``layers`` deleted."""
    return {int(i): deleted_work(target) for i in layers}


def ideal_speedup(
    shape: ModelShape,
    granularity: str,
    capacities: Mapping[int, float],
    phase: str,
    context: int,
    batch: int = 1,
    new_tokens: int = 1,
) -> float:
    """``FLOPs(dense) / FLOPs(routed)`` for a phase, from per-layer kept shares."""
    dense = phase_flops(shape, phase, context, batch, None, new_tokens)
    routed = phase_flops(shape, phase, context, batch, routed_works(granularity, capacities), new_tokens)
    return dense.total / routed.total

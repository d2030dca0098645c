"""Token-level attention for kept tokens only.

A token that skips attention still needs its key and value: later tokens (and later decode
steps) attend to it, exactly as in training, where the gate only multiplies the attention
*update*. So keys/values (and the cache write) are computed for every token, and queries, the
attention kernel and the output projection only for the kept ones.

This needs the attention's parts, so it runs only for families whose table entry
(:mod:`routertune.routing.arch`) says how: separate q/k/v/o projections, where the q/k norms sit, and the
kernel's extra arguments. Rotary embedding and the eager kernel are the family's own functions,
taken from its modeling module. The attach-time probe checks the result against the family's own
attention; every other family computes all queries (:func:`supports_kept_queries`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from routertune.routing.arch import KEPT_QUERY_PARTS, ArchSpec


def supports_kept_queries(attn: nn.Module, spec: ArchSpec) -> bool:
    """Whether queries can be restricted to kept tokens for this attention module."""
    return (
        spec.kept_queries
        and attn.config._attn_implementation in ("sdpa", "eager")
        and all(hasattr(attn, p) for p in (*KEPT_QUERY_PARTS, "head_dim", "scaling"))
        and hasattr(_modeling_module(attn), "apply_rotary_pos_emb")
    )


def _modeling_module(attn: nn.Module):
    return sys.modules[type(attn).__module__]


def _rotary(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The family's own rotary embedding applied to ``x`` (B, H, T, D) alone.

    The family's function rotates a query and a key together; queries and keys are needed at
    different positions here, so the second slot gets a zero-head view and computes nothing.
    """
    return _modeling_module(attn).apply_rotary_pos_emb(x, x[:, :0], cos, sin)[0]


def _heads(attn: nn.Module, spec: ArchSpec, proj: nn.Module, norm: str, x: torch.Tensor) -> torch.Tensor:
    """``proj(x)`` split into heads, through the family's q/k norm: (B, H, T, D)."""
    B, T, _ = x.shape
    y = proj(x)
    use_norm = norm is not None and spec.qk_norm is not None and getattr(attn, "use_qk_norm", True)
    if use_norm and spec.qk_norm == "full":
        y = getattr(attn, norm)(y)
    y = y.view(B, T, -1, attn.head_dim)
    if use_norm and spec.qk_norm == "head":
        y = getattr(attn, norm)(y)
    return y.transpose(1, 2)


def keys_and_values(attn: nn.Module, spec: ArchSpec, x: torch.Tensor, position_embeddings, cache: Any):
    """Keys (rotated) and values of every token, written to ``cache`` (B, Hkv, S, D)."""
    k = _heads(attn, spec, attn.k_proj, "k_norm", x)
    v = _heads(attn, spec, attn.v_proj, None, x)
    cos, sin = position_embeddings
    k = _rotary(attn, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    return k, v


def kept_query_attention(
    attn: nn.Module,
    spec: ArchSpec,
    x: torch.Tensor,
    keep: torch.Tensor,
    max_kept: int,
    attention_mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: Any,
) -> torch.Tensor:
    """Attention output for the kept tokens only (zeros at skipped tokens).

    Rows are padded to the largest kept count ``max_kept``; padded query slots sit on skipped
    positions and are zeroed.

    Args:
        x: ``(B, T, C)`` the attention's input.
        keep: ``(B, T)`` bool.
        max_kept: ``keep.sum(1).max()``, already on the host (> 0).
        attention_mask: the layer's mask ``(B|1, 1, T, S)`` (bool or additive) or None (causal).

    Returns:
        ``(B, T, C)`` attention output.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    B, T, C = x.shape
    k, v = keys_and_values(attn, spec, x, position_embeddings, cache)
    S = k.shape[2]

    # Kept positions first (in order), then skipped ones: order[:, :max_kept] holds every kept
    # token of each row, padded with distinct skipped positions.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :max_kept]  # (B, n)
    valid = keep.gather(1, order)  # (B, n)
    xq = x.gather(1, order.unsqueeze(-1).expand(-1, -1, C))  # (B, n, C)
    q = _heads(attn, spec, attn.q_proj, "q_norm", xq)  # (B, H, n, D)
    cos, sin = position_embeddings
    pos_idx = order.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
    q = _rotary(attn, q, cos.expand(B, -1, -1).gather(1, pos_idx), sin.expand(B, -1, -1).gather(1, pos_idx))

    if attention_mask is None:
        # transformers omits the mask where the kernel's own rule is exact: a one-token step sees
        # every key; a longer chunk is causal from the first key (sdpa's is_causal, aligned to the
        # top left, which also holds for a static cache's unfilled tail). The kept queries are no
        # longer the chunk's rows in order, so that rule is spelt out on their positions.
        mask = None
        if T > 1:
            key_pos = torch.arange(S, device=x.device)
            mask = key_pos.view(1, 1, 1, S) <= order.view(B, 1, max_kept, 1)  # (B, 1, n, S)
    else:
        m = attention_mask.expand(B, -1, -1, -1)
        mask = m.gather(2, order.view(B, 1, max_kept, 1).expand(-1, m.shape[1], -1, m.shape[-1]))

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        attn.config._attn_implementation, _modeling_module(attn).eager_attention_forward
    )
    out, _ = interface(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, **spec.kernel_kwargs(attn))
    out = attn.o_proj(out.reshape(B, max_kept, -1))  # (B, n, C)
    out = torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
    update = x.new_zeros(B, T, out.shape[-1])
    return update.scatter(1, order.unsqueeze(-1).expand(-1, -1, out.shape[-1]), out.to(update.dtype))


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """``rows`` (sorted) as half-open runs of consecutive rows: [0, 1, 4, 6, 7] -> (0,2), (4,5), (6,8)."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def kept_row_attention(
    attn: nn.Module,
    spec: ArchSpec,
    x: torch.Tensor,
    rows: list[int],
    attention_mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: Any,
) -> torch.Tensor:
    """Attention output of a decode step (one token per row) for the batch rows ``rows`` only.

    Keys/values of every row are written to the cache; queries, the kernel and the output
    projection run for the kept rows. The kernel reads the cache in place: each run of
    consecutive kept rows is a view of the cache's rows (no copy of keys/values, which at decode
    would move as many bytes as the skipped rows' attention reads), one kernel call per run.

    Args:
        x: ``(B, 1, C)`` the attention's input.
        rows: the kept rows, sorted, on the host (at least one, not all).
        attention_mask: the layer's mask ``(B|1, 1, 1, S)`` (bool or additive) or None.

    Returns:
        ``(B, 1, C)`` attention output (zeros in the skipped rows).
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    B, T, C = x.shape
    k, v = keys_and_values(attn, spec, x, position_embeddings, cache)
    index = torch.tensor(rows, device=x.device)
    q = _heads(attn, spec, attn.q_proj, "q_norm", x.index_select(0, index))  # (K, H, 1, D)
    cos, sin = (t.index_select(0, index) if t.shape[0] == B and B > 1 else t for t in position_embeddings)
    q = _rotary(attn, q, cos, sin)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        attn.config._attn_implementation, _modeling_module(attn).eager_attention_forward
    )
    outs, start = [], 0
    for a, b in _runs(rows):
        mask = attention_mask
        if mask is not None and mask.shape[0] == B:
            mask = mask[a:b]
        out, _ = interface(
            attn, q[start : start + b - a], k[a:b], v[a:b], mask,
            dropout=0.0, scaling=attn.scaling, **spec.kernel_kwargs(attn),
        )  # fmt: skip
        outs.append(out)
        start += b - a
    out = attn.o_proj(torch.cat(outs).reshape(len(rows), T, -1))  # (K, 1, C)
    return x.new_zeros(B, T, out.shape[-1]).index_copy(0, index, out.to(x.dtype))

"""Batch rows of the attention mask each kernel takes.

A routed sub-layer that some rows of a batch skip runs its attention on the kept rows alone, so
the layer's attention mask must be cut to those rows. What transformers hands a decoder layer
depends on the attention kernel (``config._attn_implementation``):

* ``eager`` / ``sdpa``: a 4-D tensor ``(B|1, 1, Q, S)`` (bool or additive) or None;
* ``flash_attention_*``: the 2-D padding mask ``(B, S)`` or None (the kernel is causal itself);
* ``flex_attention``: a :class:`~torch.nn.attention.flex_attention.BlockMask`, whose
  ``mask_mod`` reads the batch index (the padding of row ``b``).

Tensors are cut with ``index_select``. A BlockMask is cut by torch's own batch indexing, which
keeps the block tables but leaves a ``mask_mod`` that refuses to run; the cut mask gets the
original ``mask_mod`` with its batch index mapped back to the original row, so partially masked
blocks are evaluated exactly as before. Anything else is not cut (:func:`rows_selectable` says
so) and the caller computes every row instead.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # torch builds without flex attention have no BlockMask: nothing to cut
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # pragma: no cover - every supported torch has it
    BlockMask = None


def is_block_mask(mask: Any) -> bool:
    return BlockMask is not None and isinstance(mask, BlockMask)


def rows_selectable(mask: Any) -> bool:
    """Whether :func:`select_mask_rows` can cut ``mask`` to some of its batch rows."""
    return mask is None or isinstance(mask, torch.Tensor) or is_block_mask(mask)


def mask_batch(mask: Any) -> int | None:
    """The batch size a mask is built for (1: broadcast over the batch); None for no mask."""
    if mask is None:
        return None
    if is_block_mask(mask):
        return mask.kv_num_blocks.shape[0]
    return mask.shape[0]


def select_mask_rows(mask: Any, rows: torch.Tensor, batch_size: int) -> Any:
    """``mask`` restricted to batch rows ``rows`` (long, on the mask's device or any); a mask
    broadcast over the batch (batch dimension 1) is returned as it is."""
    if mask is None or batch_size == 1 or mask_batch(mask) != batch_size:
        return mask
    if is_block_mask(mask):
        return _block_mask_rows(mask, rows.to(mask.kv_num_blocks.device))
    return mask.index_select(0, rows.to(mask.device))


def _block_mask_rows(mask, rows: torch.Tensor):
    cut = mask[rows]
    original = mask.mask_mod

    def mask_mod(batch_idx, head_idx, q_idx, kv_idx):
        return original(rows[batch_idx], head_idx, q_idx, kv_idx)

    cut.mask_mod = mask_mod
    return cut

"""The router: one ``Linear(hidden_size, 1, bias=False)`` and its keep/skip decision.

A router scores the input-layernormed hidden state of its decoder layer: the mean over the
non-padding tokens of each sequence (``*_sequence``) or each token (``*_token``). A unit is
kept iff ``sigmoid(logit) - threshold >= 0``. Weights start at zero, so every score starts at
0.5 and, at the default threshold 0.5, every layer starts fully on.
"""

from __future__ import annotations

import torch
from torch import nn

# Thresholds that fix a layer's decision without scoring: sigmoid scores lie in (0, 1), so a
# threshold <= 0 keeps every unit and one above 1 skips every unit. The routed layer then takes
# its no-scoring path (no router forward, no host read of the decision).
KEEP_ALL_THRESHOLD = 0.0
SKIP_ALL_THRESHOLD = 2.0


class Float32Linear(nn.Linear):
    """A bias-free ``Linear`` that computes in float32 whatever its weight's dtype.

    A module of its own (not ``F.linear`` on the weight inside ``Router.forward``) so that engines
    that gather a module's parameters around its own forward, as DeepSpeed ZeRO-3 does, see the
    router weight being used.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # (the checks skip two no-op casts per call: a decode step calls this once per routed layer)
        return nn.functional.linear(
            x if x.dtype == torch.float32 else x.float(), w if w.dtype == torch.float32 else w.float()
        )


class Router(nn.Module):
    """Scores hidden states; higher means "compute this unit".

    Args:
        hidden_size: width of the decoder's hidden state.
        threshold: keep iff ``sigmoid(logit) - threshold >= 0``.
    """

    def __init__(self, hidden_size: int, threshold: float = 0.5) -> None:
        super().__init__()
        self.proj = Float32Linear(hidden_size, 1, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Router scores in (0, 1), computed in float32 for stable decisions.

        Args:
            x: ``(..., hidden)`` normalised hidden states.

        Returns:
            ``(...)`` sigmoid scores.
        """
        return torch.sigmoid(self.proj(x).squeeze(-1))

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = float(value)
        # Stored, not derived on each read: a compiled graph that reads it guards on this
        # True / False / None only, so moving a scored threshold (0.5 -> 0.55) does not recompile.
        self._fixed_decision = True if value <= KEEP_ALL_THRESHOLD else (False if value > 1.0 else None)

    @property
    def fixed_decision(self) -> bool | None:
        """True when the threshold keeps every unit, False when it skips every unit, None when
        the scores decide."""
        return self._fixed_decision

    def keep(self, scores: torch.Tensor) -> torch.Tensor:
        """Hard decision: ``(...)`` bool, True where the unit is computed."""
        return (scores - self.threshold) >= 0

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


def straight_through_gate(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The seed's straight-through estimator: forward value is the hard 0/1 decision,
    backward passes the gradient to the score unchanged.

    ``hard + scores - scores.detach()`` is exactly ``hard`` in the forward pass.
    """
    hard = keep.to(scores.dtype)
    return hard + scores - scores.detach()


def masked_sequence_mean(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` over the non-padding tokens of each sequence.

    Args:
        x: ``(B, T, C)``.
        token_mask: ``(B, T)`` 1 for real tokens, 0 for padding; None means all real.

    Returns:
        ``(B, C)`` float32.
    """
    x = x.float()
    if token_mask is None:
        return x.mean(dim=1)
    m = token_mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

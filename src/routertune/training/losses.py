"""Training losses beyond the model's own LM loss: self-distillation towards the dense model.

The teacher is the same network with every routed unit on (``all_units_kept``), so no second
model is held in memory and no labels are needed: the student (routed) model learns to predict
what the dense model predicts. The loss is KL(teacher || student) per predicted position,
averaged over the selected positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routertune.data.encode import IGNORE_INDEX

LOSS_MODES = ("lm", "distill", "lm+distill")
DISTILL_TOKENS = ("labels", "all")


def distill_positions(
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    tokens: str,
    shape: tuple[int, int],
) -> torch.Tensor:
    """Which logit positions carry the distillation loss.

    Logits at position ``t`` predict token ``t + 1`` (causal LM), so position ``t`` counts when
    token ``t + 1`` is a label token (``tokens="labels"``) or a real, non-padding token
    (``tokens="all"``). The last position never counts: it predicts nothing in the batch.

    Args:
        attention_mask: ``(B, T)`` 1 for real tokens, or None (all real).
        labels: ``(B, T)`` token ids with ``-100`` where no loss is taken, or None.
        tokens: ``"labels"`` or ``"all"``.
        shape: ``(B, T)``.

    Returns:
        ``(B, T)`` bool.
    """
    if tokens not in DISTILL_TOKENS:
        raise ValueError(f"distill tokens must be one of {DISTILL_TOKENS}; got {tokens!r}")
    B, T = shape
    if tokens == "labels":
        if labels is None:
            raise ValueError(
                "distilling on label tokens needs labels in the batch (or use distill tokens 'all')"
            )
        target = labels != IGNORE_INDEX  # (B, T)
    elif attention_mask is not None:
        target = attention_mask.bool()
    else:
        target = torch.ones(shape, dtype=torch.bool, device=labels.device if labels is not None else None)
    positions = torch.zeros((B, T), dtype=torch.bool, device=target.device)
    positions[:, :-1] = target[:, 1:]
    if attention_mask is not None:
        positions &= attention_mask.bool()  # a padding position never predicts anything
    return positions


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    positions: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over selected positions of KL(teacher || student) of the next-token distributions.

    Computed in float32 on the selected positions only, so memory is ``N x V`` rather than
    ``B x T x V`` when few positions are selected. Scaled by ``temperature**2`` (Hinton et al.)
    so its gradient keeps the same size across temperatures.

    Args:
        student_logits: ``(B, T, V)``, with grad.
        teacher_logits: ``(B, T, V)``, no grad.
        positions: ``(B, T)`` bool from :func:`distill_positions`.
        temperature: softens both distributions; 1.0 = plain KL.

    Returns:
        Scalar tensor; 0 (still attached to the student) when no position is selected.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0; got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    student = student_logits[positions].float() / temperature  # (N, V)
    teacher = teacher_logits[positions].float() / temperature  # (N, V)
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_p_student = F.log_softmax(student, dim=-1)
    log_p_teacher = F.log_softmax(teacher, dim=-1)
    # sum_v p_t (log p_t - log p_s), averaged over positions
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * (temperature**2)

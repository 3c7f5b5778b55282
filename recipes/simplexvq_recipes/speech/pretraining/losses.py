"""Losses of wav2vec 2.0 pretraining as pure functions: the contrastive task (eq. 15) and the feature penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_logits(
    predictions: Tensor,
    targets: Tensor,
    distractors: Tensor,
    temperature: float,
    valid: Tensor | None = None,
) -> Tensor:
    """Eq. 15's logits: cosine similarity of each prediction to its target and to its distractors, over ``T``.

    ``predictions``, ``targets``: (N, D), row i the Transformer output and the quantized target of masked frame i;
    ``distractors``: (N, K) row indices into ``targets`` (see :func:`~simplexvq_recipes.speech.pretraining.masking.
    sample_distractors`); ``valid``: (N,) bool, False where a frame has no distractors. Returns (N, 1 + K) float32
    logits with the target in column 0. A distractor equal to the target (the same code) cannot be told apart from
    it and gets ``-inf``, as in wav2vec 2.0; so do all distractors of rows that are not ``valid``.
    """
    predictions = predictions.float()
    targets = targets.float()
    negatives = targets[distractors]  # (N, K, D)
    candidates = torch.cat([targets[:, None, :], negatives], dim=1)  # (N, 1 + K, D)
    logits = F.cosine_similarity(predictions[:, None, :], candidates, dim=-1) / temperature
    same_as_target = (negatives == targets[:, None, :]).all(dim=-1)  # (N, K)
    if valid is not None:
        same_as_target = same_as_target | ~valid[:, None]
    return torch.cat([logits[:, :1], logits[:, 1:].masked_fill(same_as_target, float("-inf"))], dim=1)


def contrastive_loss(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of picking column 0 (the target), and the accuracy of the argmax (ties count as wrong)."""
    zeros = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, zeros)
    with torch.no_grad():
        best_distractor = logits[:, 1:].amax(dim=1) if logits.shape[1] > 1 else torch.full_like(logits[:, 0], -1e30)
        accuracy = (logits[:, 0] > best_distractor).float().mean()
    return loss, accuracy


def feature_penalty(features: Tensor, padding: Tensor | None = None) -> Tensor:
    """Mean squared CNN output over unpadded frames (wav2vec 2.0's ``features_pen``), computed in float32."""
    if padding is not None:
        features = features[~padding]
    return features.float().pow(2).mean()


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor`` (wav2vec 2.0's ``feature_grad_mult``)."""
    if factor == 1.0:
        return x
    return x.detach() + (x - x.detach()) * factor  # value exactly x

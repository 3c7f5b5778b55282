"""Put an auxiliary loss into the gradient without putting it into the loss that the trainer differentiates.

fairseq2's ``Wav2Vec2Model.compute_loss`` only knows the contrastive, diversity and feature-penalty terms, and
fairseq2's trainer backpropagates exactly that sum. The quantizer's own loss (KNN, perplexity or commitment) is
therefore attached to the quantized vectors with :func:`inject_aux_loss`, an identity in the forward pass whose
backward also sends ``weight`` (times the loss scale, below) to the auxiliary loss, as mixture-of-experts load
balancing losses are often injected. The gradient is that of ``task_loss + weight * aux_loss``.

**Loss scale.** A trainer that multiplies the loss before ``backward`` (fp16 loss scaling, which fairseq2's
wav2vec2 recipe uses by default, or ``loss / num_batches`` for gradient accumulation) multiplies every task
gradient, but an injected constant would not follow. :func:`probe_grad_scale` wraps the task loss in a second
identity whose backward records the gradient arriving at it, ``d(what backward was called on) / d(task loss)``,
into a :class:`GradScale`; the injection reads it. Autograd runs the probe first (it is nearer the root), so the
injected gradient is exactly that of ``c * (task_loss + weight * aux_loss)`` for any multiplier ``c``. Without a
probe (the task loss was assembled elsewhere) the scale is 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class GradScale:
    """The gradient that reached one forward pass's task loss in backward (``None`` until it does)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def get(self) -> Tensor | float:
        return 1.0 if self.value is None else self.value


class _InjectAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, carrier: Tensor, aux_loss: Tensor, weight: float, scale: GradScale) -> Tensor:
        ctx.weight = weight
        ctx.scale = scale
        ctx.aux_shape = aux_loss.shape
        ctx.aux_dtype = aux_loss.dtype
        return carrier.view_as(carrier)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        scale = ctx.scale.get()
        grad_aux = torch.full(ctx.aux_shape, ctx.weight, dtype=ctx.aux_dtype, device=grad.device) * scale
        return grad, grad_aux, None, None


class _ProbeGradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, loss: Tensor, scale: GradScale) -> Tensor:
        ctx.scale = scale
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        ctx.scale.value = grad.detach().float()
        return grad, None


def inject_aux_loss(carrier: Tensor, aux_loss: Tensor, weight: float, scale: GradScale | None = None) -> Tensor:
    """Return ``carrier`` unchanged; in backward, give ``aux_loss`` the gradient ``weight * scale``.

    ``carrier`` must lie on the path to the loss that is differentiated (here: the quantized vectors, which every
    wav2vec 2.0 loss uses); ``aux_loss`` is a scalar with a graph. The gradient reaching ``carrier`` passes through.
    """
    if aux_loss.dim() != 0:
        raise ValueError(f"inject_aux_loss: aux_loss must be a scalar, got shape {tuple(aux_loss.shape)}")
    return _InjectAuxLoss.apply(carrier, aux_loss, float(weight), scale if scale is not None else GradScale())


def probe_grad_scale(loss: Tensor, scale: GradScale) -> Tensor:
    """Return ``loss`` unchanged; in backward, record the gradient arriving at it into ``scale``."""
    return _ProbeGradScale.apply(loss, scale)

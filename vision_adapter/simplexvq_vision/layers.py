"""Building blocks of the paper's autoencoder (appendix B.1), made of timm layers.

Every convolution is 3x3; all but the input and output ones are depthwise separable (Chollet, 2017), which the
paper chose for memory (the KNN regularizer needs large batches of latent pixels).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from timm.layers import GroupNormAct, SeparableConv2d, create_act_layer
from torch import Tensor, nn


def group_count(channels: int, max_groups: int) -> int:
    """The largest number of GroupNorm groups <= ``max_groups`` that divides ``channels``."""
    return math.gcd(channels, max_groups)


class SeparableConvNormAct(nn.Sequential):
    """Depthwise-separable 3x3 convolution (timm's ``SeparableConv2d``), GroupNorm, then the activation."""

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, norm_groups: int, activation: str, act: bool
    ) -> None:
        super().__init__()
        self.conv = SeparableConv2d(in_channels, out_channels, kernel_size=3, stride=stride)
        self.norm = GroupNormAct(
            out_channels,
            num_groups=group_count(out_channels, norm_groups),
            apply_act=act,
            act_layer=activation,
            inplace=False,
        )


class ResidualBlock(nn.Module):
    """ResNet basic block (He et al., 2016) with depthwise-separable convolutions: ``act(x + f(x))``."""

    def __init__(self, channels: int, *, norm_groups: int, activation: str) -> None:
        super().__init__()
        self.conv1 = SeparableConvNormAct(channels, channels, norm_groups=norm_groups, activation=activation, act=True)
        self.conv2 = SeparableConvNormAct(channels, channels, norm_groups=norm_groups, activation=activation, act=False)
        self.act = create_act_layer(activation, inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.conv2(self.conv1(x)))


class EncoderStage(nn.Sequential):
    """A (strided) separable convolution changing the channels, followed by a residual block."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, norm_groups: int, activation: str) -> None:
        super().__init__()
        self.down = SeparableConvNormAct(
            in_channels, out_channels, stride=stride, norm_groups=norm_groups, activation=activation, act=True
        )
        self.block = ResidualBlock(out_channels, norm_groups=norm_groups, activation=activation)


class DecoderStage(nn.Module):
    """Interpolation by ``scale`` (if > 1), a separable convolution changing the channels, then a residual block."""

    def __init__(
        self, in_channels: int, out_channels: int, *, scale: int, mode: str, norm_groups: int, activation: str
    ) -> None:
        super().__init__()
        self.scale = scale
        self.mode = mode
        self.conv = SeparableConvNormAct(
            in_channels, out_channels, norm_groups=norm_groups, activation=activation, act=True
        )
        self.block = ResidualBlock(out_channels, norm_groups=norm_groups, activation=activation)

    def forward(self, x: Tensor) -> Tensor:
        if self.scale > 1:
            x = F.interpolate(x, scale_factor=self.scale, mode=self.mode)
        return self.block(self.conv(x))

    def extra_repr(self) -> str:
        return f"scale={self.scale}, mode={self.mode}"

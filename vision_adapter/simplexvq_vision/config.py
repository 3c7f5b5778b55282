"""Typed configuration of the discrete autoencoder and the three named presets of the paper's Table 3."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from simplexvq import QuantizerSpec


@dataclass(kw_only=True)
class AutoencoderConfig:
    """Architecture and quantizer of a :class:`~simplexvq_vision.DiscreteAutoencoder`.

    The encoder is an input convolution ``image_channels -> stem_channels`` followed by one stage per entry of
    ``channels`` / ``strides``: a depthwise-separable 3x3 convolution with that stride, then a residual block. The
    last stage is the projection to the latent (``channels[-1]`` channels, no residual block, no normalisation), so
    the latent is ``(H / prod(strides)) x (W / prod(strides)) x channels[-1]``. The decoder mirrors the encoder with
    interpolation instead of strides and ends with an output convolution back to ``image_channels``.

    ``backbone`` (a timm model name) replaces the convolutional encoder by that network's feature map whose
    reduction equals ``prod(strides)``, projected to ``channels[-1]`` by a 1x1 convolution; the decoder is unchanged.
    """

    image_channels: int = 3
    stem_channels: int = 256
    channels: list[int] = field(default_factory=lambda: [128, 128, 64, 64, 32, 32])
    strides: list[int] = field(default_factory=lambda: [1, 2, 2, 2, 2, 1])
    norm_groups: int = 32
    """GroupNorm groups (reduced to the largest divisor of a layer's channels). Not stated in the paper."""
    activation: str = "silu"
    """Any timm activation name. Not stated in the paper."""
    upsample_mode: str = "nearest"
    """``torch.nn.functional.interpolate`` mode of the decoder (``nearest``, ``bilinear``, ...)."""
    backbone: str | None = None
    """timm model name used as the encoder (``timm.create_model(name, features_only=True)``); None: the paper's."""
    backbone_pretrained: bool = False
    """Load the backbone's pretrained weights (timm downloads or reads them from its cache); never needed."""
    quantizer: QuantizerSpec = field(
        default_factory=lambda: QuantizerSpec(method="softmax-knn_ce", codebook_size=1024, knn_k=2)
    )
    """Any registered quantizer and its options (:class:`simplexvq.QuantizerSpec`: ``method``, ``codebook_size``,
    ``groups``, ``knn_k``, ``knn_scope``, ``memory_efficient``, ...; ``None`` keeps the library's default). Its
    ``dim`` is the latent channels ``channels[-1]``, fixed by the architecture."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if not self.channels or len(self.channels) != len(self.strides):
            raise ValueError(
                f"AutoencoderConfig: channels {list(self.channels)} and strides {list(self.strides)} must be non-empty "
                "lists of the same length (one entry per encoder stage)"
            )
        if self.quantizer.codebook_size is None:
            raise ValueError("AutoencoderConfig: set quantizer.codebook_size (entries per codebook)")
        for name in ("image_channels", "stem_channels", "codebook_size", "groups", "norm_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AutoencoderConfig: {name} must be a positive integer, got {value!r}")
        if any(c < 1 for c in self.channels):
            raise ValueError(f"AutoencoderConfig: channels must be positive, got {list(self.channels)}")
        if any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"AutoencoderConfig: strides must be 1 or 2, got {list(self.strides)}")
        if self.latent_channels % self.groups:
            raise ValueError(
                f"AutoencoderConfig: latent channels {self.latent_channels} (channels[-1]) are not divisible by "
                f"quantizer.groups={self.groups}"
            )
        self.quantizer.validate(dim=self.latent_channels)

    @property
    def codebook_size(self) -> int:
        """Entries per codebook (``quantizer.codebook_size``)."""
        return self.quantizer.codebook_size

    @property
    def groups(self) -> int:
        """Codebooks (``quantizer.groups``, else the library's default of 1)."""
        return self.quantizer.groups if self.quantizer.groups is not None else 1

    @property
    def method(self) -> str:
        return self.quantizer.method

    @property
    def latent_channels(self) -> int:
        return self.channels[-1]

    @property
    def reduction(self) -> int:
        """Spatial downsampling factor from image to latent."""
        return math.prod(self.strides)

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(h, w, C) of the latent map of an image of ``height`` x ``width`` pixels."""
        width = height if width is None else width
        r = self.reduction
        if height % r or width % r:
            raise ValueError(f"image size {height}x{width} is not divisible by the encoder's reduction {r}")
        return height // r, width // r, self.latent_channels

    def build_quantizer(self) -> nn.Module:
        """The quantizer of :attr:`quantizer` on ``latent_channels`` features."""
        return self.quantizer.build(dim=self.latent_channels)


# Table 3 of the paper: latent channels and resolutions after the input convolution (3 -> 256 channels) at
# 256 x 256 input. Codebook sizes are the paper's (8196, sic). K: the paper's K = 2 x 4 and 8 x 4 on four GPUs,
# i.e. 2 and 8 neighbours per GPU (section 4.1).
PRESETS: dict[str, AutoencoderConfig] = {
    "16x16x32": AutoencoderConfig(
        channels=[128, 128, 64, 64, 32, 32],
        strides=[1, 2, 2, 2, 2, 1],
        quantizer=QuantizerSpec(method="softmax-knn_ce", codebook_size=1024, knn_k=2),
    ),
    "64x64x3": AutoencoderConfig(
        channels=[128, 64, 32, 3],
        strides=[1, 2, 2, 1],
        quantizer=QuantizerSpec(method="softmax-knn_ce", codebook_size=8196, knn_k=8),
    ),
    "64x64x32": AutoencoderConfig(
        channels=[128, 64, 32, 32],
        strides=[1, 2, 2, 1],
        quantizer=QuantizerSpec(method="softmax-knn_ce", codebook_size=8196, knn_k=8),
    ),
}


def preset(name: str, **overrides: Any) -> AutoencoderConfig:
    """A copy of the named Table 3 preset with ``overrides`` (any :class:`AutoencoderConfig` field) applied."""
    if name not in PRESETS:
        raise KeyError(f"unknown autoencoder preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **{"quantizer": copy.deepcopy(PRESETS[name].quantizer), **overrides})

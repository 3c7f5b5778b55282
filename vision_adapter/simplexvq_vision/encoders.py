"""Encoders: the paper's separable-convolution encoder, or any timm convolutional backbone."""

from __future__ import annotations

import timm
import torch
from timm.layers import GroupNormAct, SeparableConv2d, create_conv2d
from torch import Tensor, nn

from simplexvq_vision.config import AutoencoderConfig
from simplexvq_vision.layers import EncoderStage, group_count


class ConvEncoder(nn.Module):
    """Input conv (image -> stem channels), strided separable stages with residual blocks, latent projection."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.reduction = config.reduction
        self.out_channels = config.latent_channels
        self.stem = nn.Sequential(
            create_conv2d(config.image_channels, config.stem_channels, 3, bias=True),
            GroupNormAct(
                config.stem_channels,
                num_groups=group_count(config.stem_channels, config.norm_groups),
                act_layer=config.activation,
                inplace=False,
            ),
        )
        stages = []
        previous = config.stem_channels
        for channels, stride in zip(config.channels[:-1], config.strides[:-1], strict=True):
            stages.append(
                EncoderStage(
                    previous, channels, stride=stride, norm_groups=config.norm_groups, activation=config.activation
                )
            )
            previous = channels
        self.stages = nn.Sequential(*stages)
        # the latent is the quantizer's input: no normalisation or activation after the last convolution
        self.project = SeparableConv2d(
            previous, config.latent_channels, kernel_size=3, stride=config.strides[-1], bias=True
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.project(self.stages(self.stem(images)))


class TimmEncoder(nn.Module):
    """A timm backbone's feature map at the configured reduction, projected to the latent channels (1x1 conv)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        name = config.backbone
        if name is None:
            raise ValueError("TimmEncoder needs config.backbone, a timm model name")
        self.reduction = config.reduction
        self.out_channels = config.latent_channels
        with torch.device("meta"):  # only to read the feature levels, allocates nothing
            probe = timm.create_model(name, features_only=True, pretrained=False, in_chans=config.image_channels)
        reductions = probe.feature_info.reduction()
        if self.reduction not in reductions:
            raise ValueError(
                f"timm model {name!r} has feature maps at reductions {reductions}, none at the autoencoder's "
                f"reduction {self.reduction} (the product of strides {list(config.strides)}); choose strides whose "
                "product is one of them"
            )
        index = reductions.index(self.reduction)
        self.backbone = timm.create_model(
            name,
            features_only=True,
            out_indices=(index,),
            pretrained=config.backbone_pretrained,
            in_chans=config.image_channels,
        )
        self.feature_channels = self.backbone.feature_info.channels()[-1]
        self.project = create_conv2d(self.feature_channels, config.latent_channels, 1, bias=True)

    def forward(self, images: Tensor) -> Tensor:
        return self.project(self.backbone(images)[-1])


def build_encoder(config: AutoencoderConfig) -> nn.Module:
    """The timm backbone named by ``config.backbone``, or the paper's encoder when it is None."""
    return TimmEncoder(config) if config.backbone else ConvEncoder(config)

"""The decoder: the encoder's stages mirrored, with interpolation in place of strides (appendix B.1)."""

from __future__ import annotations

from timm.layers import create_conv2d
from torch import Tensor, nn

from simplexvq_vision.config import AutoencoderConfig
from simplexvq_vision.layers import DecoderStage


class ConvDecoder(nn.Module):
    """Latent (C channels) -> interpolation + separable conv + residual block per stage -> output conv (image)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        inputs = [config.stem_channels, *config.channels[:-1]]  # channels entering each encoder stage
        stages = [
            DecoderStage(
                out_channels,
                in_channels,
                scale=stride,
                mode=config.upsample_mode,
                norm_groups=config.norm_groups,
                activation=config.activation,
            )
            for in_channels, out_channels, stride in reversed(
                list(zip(inputs, config.channels, config.strides, strict=True))
            )
        ]
        self.stages = nn.Sequential(*stages)
        self.output = create_conv2d(config.stem_channels, config.image_channels, 3, bias=True)

    def forward(self, latents: Tensor) -> Tensor:
        return self.output(self.stages(latents))

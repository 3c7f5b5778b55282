"""The discrete autoencoder: encoder -> any registered simplexvq quantizer on every latent pixel -> decoder."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

import simplexvq
from simplexvq import QuantizerOutput
from simplexvq_vision.config import AutoencoderConfig
from simplexvq_vision.decoder import ConvDecoder
from simplexvq_vision.encoders import build_encoder


@dataclass
class AutoencoderOutput:
    """``reconstruction`` (B, C_img, H, W); ``latents`` the encoder output (B, C, h, w); ``quantizer`` the
    quantizer's output on the channels-last latents: ``quantized`` (B, h, w, C), ``indices`` (B, h, w, G), ``loss``
    (add it to the reconstruction loss, eq. 9), ``losses`` and ``stats``."""

    reconstruction: Tensor
    latents: Tensor
    quantizer: QuantizerOutput


class DiscreteAutoencoder(nn.Module):
    """Image autoencoder whose latent pixels are quantized by the quantizer of ``config.quantizer`` (a
    :class:`simplexvq.QuantizerSpec`).

    The adapter adds image plumbing only: quantization, its losses and its statistics come from the quantizer.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = build_encoder(config)
        self.quantizer = config.build_quantizer()
        self.decoder = ConvDecoder(config)

    def set_num_updates(self, num_updates: int) -> None:
        """Forward the optimizer step to a built-in quantizer (drives the Gumbel temperature schedule)."""
        if isinstance(self.quantizer, simplexvq.ProductQuantizer):
            self.quantizer.set_num_updates(num_updates)

    def encode(self, images: Tensor) -> Tensor:
        """Continuous latents (B, C, h, w) of ``images`` (B, C_img, H, W)."""
        if images.dim() != 4 or images.shape[1] != self.config.image_channels:
            raise ValueError(
                f"expected images of shape (B, {self.config.image_channels}, H, W), got {tuple(images.shape)}"
            )
        self.config.latent_shape(images.shape[-2], images.shape[-1])  # raises if H, W are not divisible
        return self.encoder(images)

    def quantize(self, latents: Tensor) -> QuantizerOutput:
        """Quantize every latent pixel: the quantizer sees (B, h, w, C), channels last."""
        return self.quantizer(latents.permute(0, 2, 3, 1))

    def decode(self, quantized: Tensor) -> Tensor:
        """Images from channels-last quantized latents (B, h, w, C)."""
        return self.decoder(quantized.permute(0, 3, 1, 2))

    def forward(self, images: Tensor) -> AutoencoderOutput:
        latents = self.encode(images)
        quantized = self.quantize(latents)
        return AutoencoderOutput(reconstruction=self.decode(quantized.quantized), latents=latents, quantizer=quantized)

"""simplexvq_vision: a thin timm-backed image autoencoder around any simplexvq quantizer.

>>> config = simplexvq_vision.preset("16x16x32", method="softmax-knn_ce")   # Table 3 of the paper
>>> model = simplexvq_vision.DiscreteAutoencoder(config)
>>> out = model(images)        # images (B, 3, 256, 256), normalised
>>> loss = F.mse_loss(out.reconstruction, images) + out.quantizer.loss
"""

from simplexvq_vision.autoencoder import AutoencoderOutput, DiscreteAutoencoder
from simplexvq_vision.config import PRESETS, AutoencoderConfig, preset
from simplexvq_vision.data import ImageFolderDataset, Normalizer, UnreadableImageError, center_crop_transform
from simplexvq_vision.grid import reconstruction_grid
from simplexvq_vision.inception import InceptionFeatures, load_inception
from simplexvq_vision.metrics import (
    FeatureStatistics,
    ReconstructionMeter,
    frechet_distance,
    frechet_distance_of,
    inception_score,
    psnr_per_image,
    squared_error_per_image,
)

__all__ = [
    "PRESETS",
    "AutoencoderConfig",
    "AutoencoderOutput",
    "DiscreteAutoencoder",
    "FeatureStatistics",
    "ImageFolderDataset",
    "InceptionFeatures",
    "Normalizer",
    "ReconstructionMeter",
    "UnreadableImageError",
    "center_crop_transform",
    "frechet_distance",
    "frechet_distance_of",
    "inception_score",
    "load_inception",
    "preset",
    "psnr_per_image",
    "reconstruction_grid",
    "squared_error_per_image",
]

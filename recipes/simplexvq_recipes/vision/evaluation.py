"""One pass over a validation set: code usage (whole set and per image), rMSE, PSNR and, when a feature network
is given, FID / Inception Score (or the clearly named fallback Fréchet distance). Works on any number of
processes: per-batch results are gathered with ``gather_for_metrics`` (no duplicated samples) and accumulated on
the main process; the usage meter's ``compute`` is a collective called by every process."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import DataLoader

from simplexvq import CodebookUsageMeter
from simplexvq_vision import (
    DiscreteAutoencoder,
    FeatureStatistics,
    InceptionFeatures,
    Normalizer,
    ReconstructionMeter,
    frechet_distance_of,
    inception_score,
    psnr_per_image,
    squared_error_per_image,
)


@dataclass
class Evaluation:
    """``metrics``: JSON-ready numbers (identical on every process); ``counts``: (G, M) code counts."""

    metrics: dict[str, Any]
    counts: Tensor


class _FeatureMetrics:
    """FID / IS statistics of originals vs reconstructions (main process only)."""

    def __init__(self, network: InceptionFeatures) -> None:
        self.network = network
        self.real = FeatureStatistics(2048)
        self.fake = FeatureStatistics(2048)
        self.real_probs: list[Tensor] = []
        self.fake_probs: list[Tensor] = []

    def update(self, real_features: Tensor, real_probs: Tensor, fake_features: Tensor, fake_probs: Tensor) -> None:
        self.real.update(real_features)
        self.fake.update(fake_features)
        self.real_probs.append(real_probs.cpu())
        self.fake_probs.append(fake_probs.cpu())

    def compute(self, splits: int) -> dict[str, Any]:
        info = self.network.info
        distance = frechet_distance_of(self.real, self.fake)
        result: dict[str, Any] = {info.metric_key: distance, "feature_network": info.description}
        if info.pretrained:
            result["fid"] = distance
            result["inception_score"], result["inception_score_std"] = inception_score(
                torch.cat(self.fake_probs), splits
            )
            result["reference_inception_score"], _ = inception_score(torch.cat(self.real_probs), splits)
        else:
            result["fid"] = None
            result["inception_score"] = None
            result["feature_metrics_note"] = (
                f"FID and IS not computed ({info.source}); '{info.metric_key}' is the Frechet distance on a "
                "randomly initialised Inception-v3, not comparable with FID"
            )
        return result


@torch.no_grad()
def evaluate(
    model: DiscreteAutoencoder,
    loader: DataLoader,
    accelerator: Accelerator,
    normalizer: Normalizer,
    *,
    features: InceptionFeatures | None = None,
    max_batches: int = 0,
    is_splits: int = 10,
) -> Evaluation:
    """Evaluate the (unwrapped) ``model`` in eval mode on ``loader`` (prepared by ``accelerator``)."""
    was_training = model.training
    model.eval()
    config = model.config
    meter = CodebookUsageMeter(config.groups, config.codebook_size, device=accelerator.device)
    reconstruction = ReconstructionMeter()
    feature_metrics = _FeatureMetrics(features) if features is not None and accelerator.is_main_process else None
    for batch_index, pixels in enumerate(loader):
        if max_batches and batch_index >= max_batches:
            break
        images = normalizer.normalize(pixels)
        out = model(images)
        reconstructed_pixels = normalizer.denormalize(out.reconstruction.float())
        gathered = [
            squared_error_per_image(images, out.reconstruction),
            psnr_per_image(pixels, reconstructed_pixels),
            out.quantizer.indices,
        ]
        if features is not None:
            gathered += [*features(pixels), *features(reconstructed_pixels)]
        gathered = accelerator.gather_for_metrics(gathered)
        if accelerator.is_main_process:
            squared_error, psnr, indices = gathered[:3]
            reconstruction.update(squared_error, images[0].numel(), psnr)
            meter.update(indices)
            if feature_metrics is not None:
                feature_metrics.update(*gathered[3:])
    usage = meter.compute()  # collective: every process
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        metrics = {
            **reconstruction.compute(),
            "usage": float(usage["usage"].mean()),
            "usage_per_group": usage["usage"].tolist(),
            "per_image_usage": float(usage["per_sample_usage"].mean()),
            "perplexity": float(usage["perplexity"].mean()),
            "dead_codes": int(usage["dead_codes"].sum()),
            "codebook_size": config.codebook_size,
            "groups": config.groups,
        }
        if feature_metrics is not None:
            metrics.update(feature_metrics.compute(is_splits))
    metrics = _broadcast(accelerator, metrics)
    model.train(was_training)
    return Evaluation(metrics=metrics, counts=usage["counts"].cpu())


def _broadcast(accelerator: Accelerator, metrics: dict[str, Any]) -> dict[str, Any]:
    if accelerator.num_processes == 1:
        return metrics
    from accelerate.utils import broadcast_object_list

    box = [metrics]
    broadcast_object_list(box, from_process=0)
    return box[0]


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics`` (for TensorBoard), lists expanded to ``name/<index>``."""
    scalars: dict[str, float] = {}
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        for index, item in enumerate(values):
            if isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item):
                scalars[f"{key}/{index}" if isinstance(value, list) else key] = float(item)
    return scalars

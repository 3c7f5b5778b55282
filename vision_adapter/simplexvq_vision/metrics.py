"""Image reconstruction metrics (rMSE, PSNR) and the statistics behind FID and the Inception Score.

Codebook usage is not here: it is :class:`simplexvq.CodebookUsageMeter`'s job.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def squared_error_per_image(originals: Tensor, reconstructions: Tensor) -> Tensor:
    """Sum of squared errors of each image (B,), in float64."""
    difference = (originals.double() - reconstructions.double()).flatten(1)
    return difference.pow(2).sum(dim=1)


def psnr_per_image(originals: Tensor, reconstructions: Tensor, peak: float = 1.0) -> Tensor:
    """PSNR in dB of each image (B,) for pixels in [0, peak]; +inf for a perfect reconstruction."""
    mse = (originals.double() - reconstructions.double()).flatten(1).pow(2).mean(dim=1)
    return 10.0 * torch.log10(peak**2 / mse)


class ReconstructionMeter:
    """Accumulates per-image errors: ``rmse`` = sqrt(total squared error / total values) over the whole set (the
    model's input space), ``psnr`` = mean of the per-image PSNRs (pixels in [0, 1])."""

    def __init__(self) -> None:
        self.squared_error = 0.0
        self.values = 0
        self.psnr_sum = 0.0
        self.images = 0

    def update(self, squared_error: Tensor, values_per_image: int, psnr: Tensor) -> None:
        """``squared_error`` and ``psnr``: (B,) from :func:`squared_error_per_image` / :func:`psnr_per_image`."""
        self.squared_error += float(squared_error.sum())
        self.values += values_per_image * squared_error.numel()
        self.psnr_sum += float(psnr.clamp(max=100.0).sum())  # a perfect copy counts as 100 dB, not inf
        self.images += psnr.numel()

    def compute(self) -> dict[str, float]:
        if not self.images:
            return {"rmse": math.nan, "psnr": math.nan, "num_images": 0}
        return {
            "rmse": math.sqrt(self.squared_error / self.values),
            "psnr": self.psnr_sum / self.images,
            "num_images": self.images,
        }


class FeatureStatistics:
    """Running mean and covariance of feature vectors (float64), the Gaussian that FID compares. The vectors
    themselves are kept while there are at most ``keep_samples`` of them (default: ``dim``), which makes the
    Fréchet distance of small sets cheap and exact (:func:`frechet_distance_of`)."""

    def __init__(self, dim: int, keep_samples: int | None = None) -> None:
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.keep_samples = dim if keep_samples is None else keep_samples
        self._samples: list[Tensor] | None = []

    def update(self, features: Tensor) -> None:
        features = features.detach().double().cpu().flatten(1)
        self.count += features.shape[0]
        self.total += features.sum(dim=0)
        self.outer += features.T @ features
        if self._samples is not None:
            self._samples.append(features)
            if self.count > self.keep_samples:
                self._samples = None

    def samples(self) -> Tensor | None:
        """Every feature vector seen (N, dim), or None once there were more than ``keep_samples``."""
        return torch.cat(self._samples) if self._samples else None

    def compute(self) -> tuple[Tensor, Tensor]:
        """(mean, unbiased covariance), as ``numpy.cov(features, rowvar=False)`` gives."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.total / self.count
        covariance = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, covariance


def _sqrt_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """Fréchet distance between two Gaussians (Heusel et al., 2017):
    ``|m1 - m2|^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2)``.

    ``tr(sqrt(C1 C2))`` is computed through the symmetric matrix ``C1^1/2 C2 C1^1/2`` (same eigenvalues), which
    needs only symmetric eigendecompositions, so it stays real and stable for singular covariances.
    """
    mean1, cov1, mean2, cov2 = (t.double() for t in (mean1, cov1, mean2, cov2))
    root1 = _sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mean1 - mean2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_sqrt
    return float(value.clamp_min(0))


def frechet_distance_of(first: FeatureStatistics, second: FeatureStatistics) -> float:
    """Fréchet distance between the Gaussians of two feature sets.

    With the samples at hand (N <= dim), the trace term is computed exactly from the small N1 x N2 matrix of
    centred samples: for C1 = A^T A / (N1 - 1) and C2 = B^T B / (N2 - 1), ``tr((C1 C2)^1/2)`` is the sum of the
    singular values of ``A B^T`` over ``sqrt((N1 - 1)(N2 - 1))`` (same non-zero eigenvalues). Otherwise the
    covariances are decomposed (:func:`frechet_distance`).
    """
    a, b = first.samples(), second.samples()
    if a is None or b is None:
        return frechet_distance(*first.compute(), *second.compute())
    for stats in (first, second):
        stats.compute()  # validates the counts
    mean_a, mean_b = a.mean(dim=0), b.mean(dim=0)
    a, b = a - mean_a, b - mean_b
    scale_a, scale_b = a.shape[0] - 1, b.shape[0] - 1
    trace_sqrt = torch.linalg.svdvals(a @ b.T).sum() / math.sqrt(scale_a * scale_b)
    value = (mean_a - mean_b).pow(2).sum() + a.pow(2).sum() / scale_a + b.pow(2).sum() / scale_b - 2 * trace_sqrt
    return float(value.clamp_min(0))


def inception_score(probs: Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al., 2016): ``exp(E_x KL(p(y|x) || p(y)))`` on each of ``splits`` chunks;
    returns the mean and standard deviation over the chunks. ``probs``: (N, classes) class probabilities."""
    probs = probs.double()
    splits = max(1, min(splits, probs.shape[0]))
    scores = []
    for chunk in probs.chunk(splits):
        marginal = chunk.mean(dim=0, keepdim=True)
        kl = (chunk * (chunk.clamp_min(1e-30).log() - marginal.clamp_min(1e-30).log())).sum(dim=1)
        scores.append(kl.mean().exp())
    stacked = torch.stack(scores)
    return float(stacked.mean()), float(stacked.std(unbiased=False))

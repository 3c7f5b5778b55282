"""Image metrics against reference formulas, and the Inception feature network's weights selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from simplexvq_vision import (
    FeatureStatistics,
    Normalizer,
    ReconstructionMeter,
    frechet_distance,
    frechet_distance_of,
    inception_score,
    load_inception,
    psnr_per_image,
    reconstruction_grid,
    squared_error_per_image,
)
from simplexvq_vision.inception import FALLBACK_KEY


def _reference_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_feature_statistics_and_frechet_distance_match_numpy_and_scipy():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(300, 12, generator=generator, dtype=torch.float64) @ torch.randn(
        12, 12, generator=generator, dtype=torch.float64
    )
    fake = 0.8 * real[:200] + 0.3 * torch.randn(200, 12, generator=generator, dtype=torch.float64) + 0.5
    stats_real, stats_fake = FeatureStatistics(12), FeatureStatistics(12)
    for chunk in real.split(64):
        stats_real.update(chunk)
    stats_fake.update(fake)
    mean, covariance = stats_real.compute()
    np.testing.assert_allclose(mean.numpy(), real.mean(0).numpy(), rtol=1e-10)
    np.testing.assert_allclose(covariance.numpy(), np.cov(real.numpy(), rowvar=False), rtol=1e-9, atol=1e-9)
    expected = _reference_frechet(*(t.numpy() for t in (*stats_real.compute(), *stats_fake.compute())))
    assert frechet_distance(*stats_real.compute(), *stats_fake.compute()) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mean, covariance, mean, covariance) == pytest.approx(0.0, abs=1e-8)
    shifted = frechet_distance(mean, covariance, mean + 2.0, covariance)
    assert shifted == pytest.approx(4.0 * 12, rel=1e-6)  # |m1 - m2|^2 with equal covariances


@pytest.mark.parametrize("count", [5, 40])
def test_small_sets_use_the_exact_sample_formula_and_agree_with_the_decomposition(count):
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(count, 12, generator=generator, dtype=torch.float64)
    fake = 1.5 * torch.randn(count + 3, 12, generator=generator, dtype=torch.float64) + 0.2
    kept = [FeatureStatistics(12), FeatureStatistics(12)]
    decomposed = [FeatureStatistics(12, keep_samples=0), FeatureStatistics(12, keep_samples=0)]
    for stats in (kept, decomposed):
        stats[0].update(real)
        stats[1].update(fake)
    assert (kept[0].samples() is not None) == (count <= 12) and decomposed[0].samples() is None
    expected = _reference_frechet(*(t.numpy() for t in (*kept[0].compute(), *kept[1].compute())))
    assert frechet_distance_of(*kept) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_of(*decomposed) == pytest.approx(expected, rel=1e-6)


def test_inception_score_of_known_distributions():
    confident_and_diverse = torch.eye(10).repeat(3, 1)  # every class equally often, each image certain
    assert inception_score(confident_and_diverse, splits=1) == pytest.approx((10.0, 0.0))
    one_class = torch.zeros(20, 10)
    one_class[:, 3] = 1
    assert inception_score(one_class, splits=2)[0] == pytest.approx(1.0)
    uniform = torch.full((20, 10), 0.1)
    assert inception_score(uniform)[0] == pytest.approx(1.0)


def test_rmse_over_the_set_and_psnr_per_image():
    originals = torch.zeros(3, 3, 4, 4)
    reconstructions = originals.clone()
    reconstructions[0] += 0.1
    reconstructions[1] += 0.2
    meter = ReconstructionMeter()
    for o, r in ((originals[:2], reconstructions[:2]), (originals[2:], reconstructions[2:])):
        meter.update(squared_error_per_image(o, r), o[0].numel(), psnr_per_image(o, r))
    result = meter.compute()
    assert result["rmse"] == pytest.approx(math.sqrt((0.01 + 0.04 + 0.0) / 3))
    assert result["psnr"] == pytest.approx((20.0 + 10 * math.log10(1 / 0.04) + 100.0) / 3)  # perfect copy: 100 dB
    assert result["num_images"] == 3


def test_normalizations_round_trip_and_grid_pairs_originals_with_reconstructions():
    pixels = torch.rand(4, 3, 8, 8)
    for kind in ("imagenet", "symmetric", "none"):
        normalizer = Normalizer(kind)
        assert torch.allclose(normalizer.denormalize(normalizer.normalize(pixels)), pixels, atol=1e-6)
    assert Normalizer("symmetric").normalize(torch.ones(1, 3, 1, 1)).eq(1).all()
    with pytest.raises(ValueError, match="normalization"):
        Normalizer("zscore")
    grid = reconstruction_grid(pixels, torch.zeros_like(pixels), pairs_per_row=2, padding=0, min_size=16, labels=False)
    assert grid.shape == (3, 2 * 16, 4 * 16)  # 2 rows of (original, reconstruction) x 2, enlarged 2x
    assert torch.equal(grid[:, :16, :16], pixels[0].repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert grid[:, :16, 16:32].eq(0).all()


def test_reconstruction_grid_labels_every_column_and_names_the_run():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, 3, 32, 32, generator=generator)
    plain = reconstruction_grid(pixels, 1 - pixels, pairs_per_row=2, labels=False)
    labelled = reconstruction_grid(pixels, 1 - pixels, pairs_per_row=2)
    titled = reconstruction_grid(pixels, 1 - pixels, pairs_per_row=2, title="softmax-knn_ce")
    header = labelled.shape[1] - plain.shape[1]
    assert header > 0 and titled.shape[1] > labelled.shape[1] and labelled.shape[2] == plain.shape[2]
    assert torch.equal(labelled[:, header:], plain) and torch.equal(titled[:, -plain.shape[1] :], plain)
    assert 0.0 <= float(labelled.min()) and float(labelled.max()) <= 1.0

    cell, padding = 96, 2  # 32 px images enlarged 3x to the default min_size
    ink = labelled[:, :header].mean(dim=0) < 0.5  # dark text on the white header
    columns = [ink[:, padding + c * (cell + padding) : (c + 1) * (cell + padding)] for c in range(4)]
    assert all(column.any() for column in columns), "every image column is labelled"
    assert torch.equal(columns[0], columns[2]) and torch.equal(columns[1], columns[3])  # input, reconstruction, ...
    assert not torch.equal(columns[0], columns[1])
    other = reconstruction_grid(pixels, 1 - pixels, pairs_per_row=2, title="ste-euclid")
    title_lines = titled.shape[1] - labelled.shape[1]
    title_ink, other_ink = (grid[:, :title_lines].mean(dim=0) < 0.5 for grid in (titled, other))
    assert title_ink.any() and not torch.equal(title_ink, other_ink), "the title line shows the run's name"


def test_fallback_without_weights_is_named_rng_neutral_and_a_local_weights_file_loads_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match=r"NOT computed: no Inception-v3 weights at .*inception_v3_google"):
        fallback = load_inception("auto")
    assert torch.equal(torch.get_rng_state(), state)  # exact resume: evaluating never consumes the global RNG
    assert not fallback.info.pretrained and fallback.info.metric_key == FALLBACK_KEY == "fd_random_inception_v3"
    assert "not FID" in fallback.info.description
    images = torch.rand(1, 3, 16, 16)
    features, probs = fallback(images)
    assert features.shape == (1, 2048) and probs.shape == (1, 1000)
    assert torch.isfinite(features).all() and features.abs().mean() < 1e3  # calibrated: sane scale
    assert probs.sum(dim=1).sub(1).abs().max() < 1e-9

    # TEST ONLY: these random weights stand in for the real ImageNet file to exercise the local-file path.
    weights = tmp_path / "inception_v3_RANDOM_WEIGHTS_for_tests.pth"
    torch.save(fallback.network.state_dict(), weights)
    loaded = load_inception(str(weights))
    assert loaded.info.pretrained and loaded.info.metric_key == "fid" and loaded.info.source == str(weights)
    expected = fallback.network.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in loaded.network.state_dict().items())


def test_weights_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_inception(str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        load_inception(str(wrong))

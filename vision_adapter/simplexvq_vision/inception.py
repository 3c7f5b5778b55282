"""torchvision's Inception-v3 as the feature network of FID and the Inception Score (as in the paper, B.1).

Its ImageNet weights are never downloaded implicitly. ``weights`` selects them:

* ``"auto"``: torchvision's cached file (``$TORCH_HOME/hub/checkpoints/inception_v3_google-0cc3c7bd.pth``) if it
  exists; otherwise the fallback below;
* ``"download"``: let torchvision download them (needs internet);
* a path: a state_dict file of ``torchvision.models.inception_v3`` (an error if it does not exist);
* ``"none"``: the fallback.

The fallback is *not* FID: a randomly initialised Inception-v3 (PyTorch's default initialisation, fixed seed;
BatchNorm statistics estimated once on seeded 1/f "pink" noise, which has the power spectrum of natural images, so
activations keep a sane scale), whose Fréchet distance is reported under the name ``fd_random_inception_v3`` and
never as FID; no Inception Score is computed with it.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import Inception_V3_Weights, inception_v3

from simplexvq_vision.data import IMAGENET_MEAN, IMAGENET_STD

INCEPTION_FILE = Path(Inception_V3_Weights.IMAGENET1K_V1.url).name
INCEPTION_RESOLUTION = 299
FALLBACK_KEY = "fd_random_inception_v3"


def cached_inception_path() -> Path:
    """Where torchvision keeps the downloaded Inception-v3 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


@dataclass
class FeatureNetworkInfo:
    """What the features are: ``pretrained`` True only for ImageNet Inception-v3 weights (then FID and IS are
    meaningful); ``metric_key`` is the name the Fréchet distance is reported under (``fid`` or the fallback's)."""

    pretrained: bool
    description: str
    source: str
    metric_key: str


class InceptionFeatures(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> (pool features (B, 2048), class probabilities (B, 1000))."""

    def __init__(self, network: nn.Module, info: FeatureNetworkInfo) -> None:
        super().__init__()
        self.network = network.eval()
        self.info = info
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._pool: Tensor | None = None
        self.network.avgpool.register_forward_hook(self._keep_pool)

    def _keep_pool(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self._pool = output.flatten(1)

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Always in eval mode (fixed BatchNorm statistics, no dropout, no auxiliary head)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = F.interpolate(
            images.float(), size=(INCEPTION_RESOLUTION, INCEPTION_RESOLUTION), mode="bilinear", align_corners=False
        )
        logits = self.network((x - self.mean) / self.std)  # transform_input=True rescales to the weights' range
        assert self._pool is not None
        pool, self._pool = self._pool, None
        return pool.double(), logits.double().softmax(dim=-1)


def _from_state_dict(path: Path) -> nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    aux = any(key.startswith("AuxLogits.") for key in state)
    with torch.random.fork_rng(devices=[]):  # default initialisation, overwritten below: keep the caller's RNG
        network = inception_v3(weights=None, aux_logits=aux, transform_input=True, init_weights=False)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} is not a torchvision inception_v3 state_dict: {error}") from error
    return network


def pink_noise(count: int, size: int, generator: torch.Generator) -> Tensor:
    """(count, 3, size, size) images in [0, 1] with a 1/f amplitude spectrum, like natural images."""
    white = torch.randn(count, 3, size, size, generator=generator)
    frequency = torch.fft.fftfreq(size)
    radius = (frequency[:, None] ** 2 + frequency[None, :] ** 2).sqrt().clamp_min(1.0 / size)
    noise = torch.fft.ifft2(torch.fft.fft2(white) / radius).real
    noise = (noise - noise.mean(dim=(1, 2, 3), keepdim=True)) / noise.std(dim=(1, 2, 3), keepdim=True)
    return (0.5 + 0.25 * noise).clamp(0, 1)


def _random_network(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return inception_v3(weights=None, aux_logits=False, transform_input=True, init_weights=False).eval()


def random_inception_v3(seed: int = 0) -> nn.Module:
    """The fallback feature network: random Inception-v3 weights (``seed``), BatchNorm calibrated on pink noise."""
    network = _random_network(seed)
    network.load_state_dict(_calibrated_state(seed))
    return network


@functools.cache
@torch.no_grad()
def _calibrated_state(seed: int) -> dict[str, Tensor]:
    """Computed once per process and seed (a forward pass on 4 images at 299 x 299)."""
    network = _random_network(seed)
    noise = pink_noise(4, INCEPTION_RESOLUTION, torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
            module.train()  # only BatchNorm: dropout stays off
    network((noise - mean) / std)
    return {name: value.clone() for name, value in network.eval().state_dict().items()}


def load_inception(weights: str = "auto", *, seed: int = 0) -> InceptionFeatures:
    """The FID/IS feature network selected by ``weights`` (see the module docstring); warns on the fallback.
    Never draws from the global RNG (evaluation inside a training run keeps resume exact)."""
    unavailable = None
    if weights == "download":
        with torch.random.fork_rng(devices=[]):
            network = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1)
        return InceptionFeatures(network, FeatureNetworkInfo(True, "torchvision Inception-v3", "download", "fid"))
    if weights == "auto":
        path = cached_inception_path()
        if path.is_file():
            return InceptionFeatures(
                _from_state_dict(path), FeatureNetworkInfo(True, "torchvision Inception-v3", str(path), "fid")
            )
        unavailable = f"no Inception-v3 weights at {path}"
    elif weights == "none":
        unavailable = "Inception-v3 weights disabled (inception_weights=none)"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception-v3 weights file {path} does not exist; pass a torchvision inception_v3 state_dict file, "
                "'auto', 'download' or 'none'"
            )
        return InceptionFeatures(
            _from_state_dict(path), FeatureNetworkInfo(True, "torchvision Inception-v3", str(path), "fid")
        )
    warnings.warn(
        f"FID and Inception Score are NOT computed: {unavailable}. Reporting instead the Frechet distance on a "
        f"randomly initialised Inception-v3 (seed {seed}) as '{FALLBACK_KEY}', which is not comparable with FID. "
        'To get FID/IS, download the weights (python -c "import torchvision; '
        "torchvision.models.inception_v3(weights='IMAGENET1K_V1')\") or pass the path of the file.",
        RuntimeWarning,
        stacklevel=2,
    )
    info = FeatureNetworkInfo(
        False, f"randomly initialised Inception-v3 (seed {seed}; not FID)", unavailable, FALLBACK_KEY
    )
    return InceptionFeatures(random_inception_v3(seed), info)

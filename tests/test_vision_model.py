"""The vision adapter's autoencoder: Table 3 presets, the paper's layer types, any quantizer, timm backbones."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import simplexvq
from simplexvq import QuantizerSpec
from simplexvq.spec import OPTION_NAMES
from simplexvq_recipes.training.config import load_config
from simplexvq_recipes.vision.config import VisionRecipeConfig
from simplexvq_recipes.vision.train import build_autoencoder
from simplexvq_vision import PRESETS, AutoencoderConfig, DiscreteAutoencoder, preset

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from quantizer_options import OPTION_VALUES, configured_value, option_value  # noqa: E402

PHOTOS_DEMO = Path(__file__).parents[1] / "recipes" / "simplexvq_recipes" / "configs" / "vision" / "photos_demo.yaml"

# Table 3: feature map H x W x C at 256 x 256 input, codebook size M; K per GPU from section 4.1 (K/4 of 2x4, 8x4).
TABLE3 = {"16x16x32": ((16, 16, 32), 1024, 2), "64x64x3": ((64, 64, 3), 8196, 8), "64x64x32": ((64, 64, 32), 8196, 8)}


@pytest.mark.parametrize("name", list(TABLE3))
def test_preset_latents_match_table3_at_256(name):
    (h, w, c), codebook_size, knn_k = TABLE3[name]
    config = preset(name)
    assert config.latent_shape(256) == (h, w, c)
    assert (config.codebook_size, config.quantizer.knn_k, config.stem_channels) == (codebook_size, knn_k, 256)
    with torch.device("meta"):  # full resolution without allocating anything
        model = DiscreteAutoencoder(config)
        latents = model.encoder(torch.empty(2, 3, 256, 256))
        images = model.decoder(torch.empty(2, c, h, w))
    assert tuple(latents.shape) == (2, c, h, w)
    assert tuple(images.shape) == (2, 3, 256, 256)
    assert model.quantizer.config.codebook_size == codebook_size and model.quantizer.config.dim == c


@pytest.mark.parametrize("name", list(TABLE3))
def test_only_input_and_output_convs_are_dense_the_rest_depthwise_separable(name):
    model = DiscreteAutoencoder(preset(name))
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    dense = [n for n, m in convs if m.groups == 1 and m.kernel_size != (1, 1)]
    assert dense == ["encoder.stem.0", "decoder.output"]
    assert model.encoder.stem[0].in_channels == 3 and model.encoder.stem[0].out_channels == 256
    for conv_name, conv in convs:
        if conv.kernel_size != (1, 1):
            assert conv.kernel_size == (3, 3), conv_name
            if conv_name not in dense:
                assert conv.groups == conv.in_channels == conv.out_channels, f"{conv_name} is not depthwise"
    strided = [conv.stride for _, conv in convs if conv.stride != (1, 1)]
    assert len(strided) == preset(name).strides.count(2)


@pytest.mark.parametrize("name", list(TABLE3))
def test_each_preset_forward_backward_at_reduced_resolution(name):
    torch.manual_seed(0)
    config = preset(name)
    model = DiscreteAutoencoder(config)
    size = 16  # latents 1x1 (reduction 16: 2 positions, K = 2) or 4x4 (reduction 4); depthwise convs are slow on CPU
    images = torch.randn(2, 3, size, size)
    out = model(images)
    h, w, c = config.latent_shape(size)
    assert out.reconstruction.shape == images.shape
    assert out.latents.shape == (2, c, h, w)
    assert out.quantizer.quantized.shape == (2, h, w, c)
    assert out.quantizer.indices.shape == (2, h, w, 1)
    assert set(out.quantizer.losses) == {"knn_ce"}
    loss = F.mse_loss(out.reconstruction, images) + out.quantizer.loss
    loss.backward()
    for parameter in (model.encoder.stem[0].weight, model.decoder.output.weight, model.quantizer.codebook.weight):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        hard = model(images)
    assert hard.quantizer.indices.min() >= 0 and hard.quantizer.indices.max() < config.codebook_size


TINY = dict(stem_channels=16, channels=[16, 8, 8], strides=[2, 2, 1], norm_groups=4)


@pytest.mark.parametrize("method", ["ste-euclid", "rotation-cosine", "hard_gumbel-perplexity", "simvq"])
def test_any_registered_method_quantizes_every_latent_pixel(method):
    config = AutoencoderConfig(**TINY, quantizer=QuantizerSpec(method=method, codebook_size=16, groups=2))
    model = DiscreteAutoencoder(config)
    out = model(torch.randn(3, 3, 16, 16))
    assert out.quantizer.indices.shape == (3, 4, 4, 2)
    (out.reconstruction.pow(2).mean() + out.quantizer.loss).backward()
    assert model.encoder.stem[0].weight.grad.abs().sum() > 0


class _RoundingQuantizer(nn.Module):
    """A third-party quantizer: rounds each feature to the nearest integer, straight-through."""

    def __init__(self, dim: int, codebook_size: int, groups: int = 1) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, z: torch.Tensor, padding_mask: torch.Tensor | None = None) -> simplexvq.QuantizerOutput:
        quantized = z + (z.round() - z).detach()
        indices = z.round().long().clamp(0, 1)[..., : self.groups]
        return simplexvq.QuantizerOutput(quantized=quantized, indices=indices, loss=z.new_zeros(()))


@pytest.fixture
def rounding_method():
    name = "test-vision-rounding"
    simplexvq.register_quantizer(name)(_RoundingQuantizer)
    yield name
    simplexvq.registry._REGISTRY.pop(name, None)  # leave the registry as other tests expect it


def test_third_party_registered_quantizer_is_used(rounding_method):
    model = DiscreteAutoencoder(
        AutoencoderConfig(**TINY, quantizer=QuantizerSpec(method=rounding_method, codebook_size=16))
    )
    assert isinstance(model.quantizer, _RoundingQuantizer)
    out = model(torch.randn(2, 3, 16, 16))
    assert torch.equal(out.quantizer.quantized, out.latents.permute(0, 2, 3, 1).round())


def test_timm_backbone_encoder_picks_the_feature_map_at_the_presets_reduction():
    torch.manual_seed(0)
    config = preset("64x64x32", backbone="test_resnet", stem_channels=16, channels=[16, 16, 8, 8], norm_groups=4)
    model = DiscreteAutoencoder(config)
    assert model.encoder.backbone.feature_info.reduction() == [4]  # reduction of the 64x64 presets at 256 input
    out = model(torch.randn(2, 3, 32, 32))
    assert out.latents.shape == (2, 8, 8, 8) and out.reconstruction.shape == (2, 3, 32, 32)
    (out.reconstruction.pow(2).mean() + out.quantizer.loss).backward()
    assert all(p.grad is not None for p in model.encoder.backbone.parameters())
    with pytest.raises(ValueError, match=r"reductions \[2, 4, 8, 16, 32\]"):
        DiscreteAutoencoder(preset("64x64x32", backbone="test_resnet", strides=[1, 1, 1, 1]))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="same length"):
        AutoencoderConfig(channels=[8, 4], strides=[2])
    with pytest.raises(ValueError, match="divisible by quantizer.groups=2"):
        AutoencoderConfig(channels=[8, 3], strides=[2, 1], quantizer=QuantizerSpec(codebook_size=8, groups=2))
    with pytest.raises(KeyError, match="Did you mean"):
        AutoencoderConfig(**TINY, quantizer=QuantizerSpec(method="softmax-knn-ce", codebook_size=8))
    with pytest.raises(KeyError, match="16x16x32"):
        preset("32x32x4")
    model = DiscreteAutoencoder(AutoencoderConfig(**TINY))
    with pytest.raises(ValueError, match="not divisible by the encoder's reduction 4"):
        model(torch.randn(1, 3, 18, 18))
    assert set(PRESETS) == set(TABLE3)


@pytest.mark.parametrize("option", OPTION_NAMES)
def test_every_core_quantizer_option_reaches_the_quantizer_from_the_command_line(option):
    method = "hard_gumbel-knn_ce" if option == "regularize_samples" else "softmax-knn_ce"
    overrides = [f"model.quantizer.method={method}", f"model.quantizer.{option}={OPTION_VALUES[option]}"]
    config = load_config(VisionRecipeConfig, PHOTOS_DEMO, overrides)
    model = DiscreteAutoencoder(config.model)
    expected = option_value(option)
    assert configured_value(model.quantizer.config, option) == expected
    default = simplexvq.quantizer_config(method, dim=8, codebook_size=64)
    assert configured_value(default, option) != expected


def test_presets_state_k_explicitly_and_several_processes_default_to_global_neighbours(tmp_path):
    config = load_config(VisionRecipeConfig, PHOTOS_DEMO)
    assert (config.model.quantizer.knn_k, config.model.quantizer.knn_scope) == (8, None)
    assert build_autoencoder(config.model, num_processes=2).quantizer.config.knn_scope == "global"
    assert build_autoencoder(config.model).quantizer.config.knn_scope == "local"
    assert config.model.quantizer.knn_scope is None  # the saved config keeps what the user wrote
    yaml = tmp_path / "q.yaml"
    yaml.write_text("model:\n  quantizer:\n    knn_scope: local\n    memory_efficient: true\n")
    config = load_config(VisionRecipeConfig, yaml)
    quantizer = build_autoencoder(config.model, num_processes=2).quantizer.config
    assert (quantizer.knn_scope, quantizer.memory_efficient, quantizer.knn_k) == ("local", True, 2)

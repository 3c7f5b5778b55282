"""Tests of the quantizer registry and of the error messages for bad inputs and invalid configurations."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from torch import nn

import simplexvq
import simplexvq.registry as registry
from simplexvq import (
    GumbelTemperature,
    ProductQuantizer,
    QuantizerConfig,
    QuantizerOutput,
    available_quantizers,
    build_quantizer,
    quantizer_config,
    register_quantizer,
)

DIM = 16
GROUPS = 2
CODEBOOK_SIZE = 32
KNN_K = 2
SMOOTHING = ("softmax", "soft_gumbel", "hard_gumbel")
REGULARIZERS = ("knn_ce", "knn_l2", "perplexity", "none")
EXPECTED_NAMES = sorted(
    [f"{m}-{r}" for m in SMOOTHING for r in REGULARIZERS]
    + [f"{m}-{d}" for m in ("ste", "rotation") for d in ("cosine", "euclid")]
    + ["simvq"]
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _expected_fields(name: str) -> dict[str, object]:
    """The fields a built-in name stands for: ``<smoothing>-<regularizer>``, ``<estimator>-<distance>``, ``simvq``."""
    if name == "simvq":
        return {"method": "simvq", "regularizer": "none", "distance": "euclid", "commitment_weight": 0.25}
    method, suffix = name.split("-")
    if method in SMOOTHING:
        return {"method": method, "regularizer": suffix, "distance": "cosine"}
    return {"method": method, "regularizer": "none", "distance": suffix, "commitment_weight": 1.0}


def _small(**overrides) -> ProductQuantizer:
    config = {"dim": 8, "codebook_size": 4, "groups": 2, "knn_k": 2, **overrides}
    torch.manual_seed(0)
    return ProductQuantizer(QuantizerConfig(**config))


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------


def test_available_quantizers_lists_every_builtin_sorted():
    names = available_quantizers()
    assert names == sorted(names)
    assert set(EXPECTED_NAMES) <= set(names)


@pytest.mark.parametrize("name", available_quantizers())
def test_every_registered_quantizer_trains_and_infers(name):
    torch.manual_seed(0)
    model = build_quantizer(name, dim=DIM, groups=GROUPS, codebook_size=CODEBOOK_SIZE, knn_k=KNN_K)
    assert isinstance(model, nn.Module)
    model.train()
    z = torch.randn(4, 6, DIM, generator=_gen(1)).requires_grad_(True)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 4:] = True
    out = model(z, mask)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == (4, 6, GROUPS)
    assert out.loss.dim() == 0 and math.isfinite(out.loss.item())
    upstream = torch.randn(z.shape, generator=_gen(2))
    ((out.quantized * upstream).sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert z.grad[~mask].abs().sum() > 0
    trained = [p for p in model.parameters() if p.grad is not None]
    assert trained, "no parameter received a gradient"
    assert all(torch.isfinite(p.grad).all() for p in trained)

    model.eval()
    with torch.no_grad():
        out = model(z, mask)
    valid = out.indices[~mask]
    assert torch.all((valid >= 0) & (valid < CODEBOOK_SIZE))
    assert torch.all(out.indices[mask] == -1)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_quantizer_config_fields_match_the_name(name):
    config = quantizer_config(name, dim=DIM, groups=GROUPS, codebook_size=CODEBOOK_SIZE)
    assert isinstance(config, QuantizerConfig)
    for field, value in _expected_fields(name).items():
        assert getattr(config, field) == value, field
    assert (config.dim, config.groups, config.codebook_size) == (DIM, GROUPS, CODEBOOK_SIZE)
    model = build_quantizer(name, dim=DIM, groups=GROUPS, codebook_size=CODEBOOK_SIZE)
    assert isinstance(model, ProductQuantizer)
    assert model.config == config


def test_build_quantizer_from_config_and_with_overrides():
    config = QuantizerConfig(dim=DIM, codebook_size=CODEBOOK_SIZE, groups=GROUPS, method="hard_gumbel")
    model = build_quantizer(config)
    assert isinstance(model, ProductQuantizer)
    assert model.config == config
    assert model.codebook.weight.shape == (GROUPS, CODEBOOK_SIZE, DIM // GROUPS)

    bigger = build_quantizer(config, codebook_size=64, knn_k=3)
    assert bigger.config.codebook_size == 64 and bigger.config.knn_k == 3
    assert bigger.codebook.weight.shape == (GROUPS, 64, DIM // GROUPS)
    assert bigger.config == dataclasses.replace(config, codebook_size=64, knn_k=3)
    assert config.codebook_size == CODEBOOK_SIZE  # the caller's config is not modified

    by_name = build_quantizer("softmax-knn_l2", dim=DIM, codebook_size=CODEBOOK_SIZE, regularizer_weight=0.5)
    assert by_name.config.regularizer == "knn_l2" and by_name.config.regularizer_weight == 0.5

    # Overrides are validated like any config.
    with pytest.raises(ValueError, match="not divisible by groups"):
        build_quantizer(config, groups=3)


def test_overriding_the_method_derives_its_defaults_again_but_keeps_explicit_values():
    softmax = QuantizerConfig(dim=DIM, codebook_size=CODEBOOK_SIZE, method="softmax")
    assert (softmax.distance, softmax.commitment_weight, softmax.init_temperature) == ("cosine", 1.0, 0.1)
    simvq = build_quantizer(softmax, method="simvq", regularizer="none").config
    assert (simvq.distance, simvq.commitment_weight, simvq.init_temperature) == ("euclid", 0.25, 1.0)
    assert simvq == QuantizerConfig(dim=DIM, codebook_size=CODEBOOK_SIZE, method="simvq", regularizer="none")
    # values the caller set are kept, and a derived value follows an explicit change of what it derives from
    explicit = QuantizerConfig(dim=DIM, codebook_size=CODEBOOK_SIZE, distance="cosine", commitment_weight=2.0)
    kept = explicit.replace(method="simvq", regularizer="none")
    assert (kept.distance, kept.commitment_weight, kept.init_temperature) == ("cosine", 2.0, 0.1)
    assert softmax.replace(distance="euclid").init_temperature == 1.0
    assert softmax.replace(init_temperature=0.5).replace(distance="euclid").init_temperature == 0.5
    assert dataclasses.asdict(softmax) == dataclasses.asdict(dataclasses.replace(softmax))  # no hidden field


def test_build_quantizer_rejects_other_specs():
    with pytest.raises(TypeError, match="expects a method name, a QuantizerSpec or a QuantizerConfig, got dict"):
        build_quantizer({"dim": DIM})


class _ThirdPartyQuantizer(nn.Module):
    def __init__(self, *, dim: int, codebook_size: int, groups: int = 1, scale: float = 1.0) -> None:
        super().__init__()
        self.dim, self.codebook_size, self.groups, self.scale = dim, codebook_size, groups, scale

    def forward(self, z, padding_mask=None):
        indices = torch.zeros(*z.shape[:-1], self.groups, dtype=torch.long)
        return QuantizerOutput(quantized=self.scale * z, indices=indices, loss=z.new_zeros(()))


@pytest.fixture
def third_party_name():
    name = "test-third-party-vq"
    assert name not in available_quantizers()
    yield name
    registry._REGISTRY.pop(name, None)


def test_register_third_party_quantizer(third_party_name):
    decorator = register_quantizer(third_party_name)
    factory = decorator(_ThirdPartyQuantizer)
    assert factory is _ThirdPartyQuantizer  # the decorator returns the factory unchanged
    assert third_party_name in available_quantizers()
    model = build_quantizer(third_party_name, dim=DIM, codebook_size=CODEBOOK_SIZE, scale=2.0)
    assert isinstance(model, _ThirdPartyQuantizer) and model.scale == 2.0
    z = torch.randn(3, DIM, generator=_gen(3))
    torch.testing.assert_close(model(z).quantized, 2.0 * z)

    with pytest.raises(ValueError, match=re.escape(f"{third_party_name!r} is already registered")):
        register_quantizer(third_party_name)(lambda **kwargs: None)
    assert build_quantizer(third_party_name, dim=DIM, codebook_size=CODEBOOK_SIZE).scale == 1.0  # unchanged

    def replacement(**kwargs):
        return _ThirdPartyQuantizer(scale=3.0, **kwargs)

    register_quantizer(third_party_name, overwrite=True)(replacement)
    assert build_quantizer(third_party_name, dim=DIM, codebook_size=CODEBOOK_SIZE).scale == 3.0
    # A third-party name has no built-in preset.
    with pytest.raises(KeyError, match="unknown built-in quantizer preset"):
        quantizer_config(third_party_name)


def test_builtin_names_cannot_be_silently_replaced():
    with pytest.raises(ValueError, match="'softmax-knn_ce' is already registered; pass overwrite=True"):
        register_quantizer("softmax-knn_ce")(lambda **kwargs: None)
    assert isinstance(build_quantizer("softmax-knn_ce", dim=DIM, codebook_size=CODEBOOK_SIZE), ProductQuantizer)


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("softmax-knn-ce", "softmax-knn_ce"), ("hard-gumbel-perplexity", "hard_gumbel-perplexity"), ("simvqq", "simvq")],
)
def test_unknown_name_suggests_a_close_match(typo, suggestion):
    with pytest.raises(KeyError, match=re.escape(f"unknown quantizer {typo!r}. Did you mean {suggestion!r}")):
        build_quantizer(typo, dim=DIM, codebook_size=CODEBOOK_SIZE)
    with pytest.raises(KeyError, match=re.escape(f"Did you mean {suggestion!r}")):
        quantizer_config(typo)


def test_unknown_name_without_close_match_lists_known_names():
    with pytest.raises(KeyError, match=r"unknown quantizer 'zzzzzz'\. Known names: .*softmax-knn_ce") as info:
        build_quantizer("zzzzzz")
    assert "Did you mean" not in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["softmax", "ste"])
def model(request):
    if request.param == "softmax":
        return _small(method="softmax")
    return _small(method="ste", regularizer="none")


def test_one_dimensional_input(model):
    with pytest.raises(ValueError, match=r"at least one leading \(batch\) dimension, got shape \(8,\)"):
        model(torch.randn(8))


def test_wrong_feature_size(model):
    with pytest.raises(
        ValueError, match=r"feature size 7 in its last dimension but the quantizer was built with dim=8;"
    ):
        model(torch.randn(4, 7))


def test_non_tensor_and_integer_input(model):
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        model([[0.0] * 8])
    with pytest.raises(TypeError, match="must be a floating-point tensor, got torch.int64"):
        model(torch.ones(4, 8, dtype=torch.long))


@pytest.mark.parametrize(("bad", "kind"), [(float("nan"), "NaN"), (float("inf"), "Inf"), (-float("inf"), "Inf")])
def test_non_finite_input(model, bad, kind):
    z = torch.randn(2, 5, 8)
    z[1, 2, 3] = bad
    z[0, 4, 0] = bad
    with pytest.raises(ValueError, match=rf"contains {kind} values at 2 of 10 unpadded positions"):
        model(z)


def test_nan_and_inf_input_reports_nan(model):
    z = torch.randn(6, 8)
    z[0, 0] = float("inf")
    z[3, 1] = float("nan")
    with pytest.raises(ValueError, match="contains NaN values at 2 of 6"):
        model(z)


def test_empty_batch(model):
    with pytest.raises(ValueError, match=r"holds no positions to quantize \(shape \(0, 8\)\); skip empty batches"):
        model(torch.randn(0, 8))
    with pytest.raises(ValueError, match="holds no positions to quantize"):
        model(torch.randn(2, 0, 8), torch.zeros(2, 0, dtype=torch.bool))


def test_all_padded_batch(model):
    with pytest.raises(ValueError, match=r"no positions to quantize \(shape \(2, 3, 8\), all padded\)"):
        model(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool))


def test_padding_mask_wrong_shape(model):
    with pytest.raises(ValueError, match=r"padding_mask must have the input's shape .*\(2, 3\), got \(2, 4\)"):
        model(torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"padding_mask must have .*got \(6,\)"):
        model(torch.randn(2, 3, 8), torch.zeros(6, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.long, torch.float32, torch.uint8])
def test_padding_mask_wrong_dtype(model, dtype):
    with pytest.raises(TypeError, match=rf"padding_mask must be a bool tensor \(True = padded\), got {dtype}"):
        model(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=dtype))


@pytest.mark.parametrize("regularizer", ["knn_ce", "knn_l2"])
def test_knn_with_fewer_unpadded_rows_than_k(regularizer):
    model = _small(method="softmax", regularizer=regularizer, knn_k=5)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, 0] = False  # 4 unpadded positions < K = 5
    with pytest.raises(ValueError, match=r"k=5 neighbours .* only N=4 \(unpadded\) positions; K must not exceed N"):
        model(torch.randn(2, 4, 8), mask)
    assert math.isfinite(model(torch.randn(5, 8)).loss.item())  # K = N is fine


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_eval_batch_with_fewer_rows_than_k_leaves_the_knn_term_out(memory_efficient):
    model = _small(method="softmax", regularizer="knn_ce", knn_k=5, memory_efficient=memory_efficient).eval()
    small = model(torch.randn(4, 8))  # N = 4 < K = 5: no error in eval mode, the term is absent
    assert "knn_ce" not in small.losses and small.loss.item() == 0.0 and small.indices.shape == (4, 2)
    assert "knn_ce" in model(torch.randn(5, 8)).losses  # N >= K: computed as usual
    with pytest.raises(ValueError, match="K must not exceed N"):
        model.train()(torch.randn(4, 8))  # training still refuses


# --------------------------------------------------------------------------------------------------------------
# Invalid configurations
# --------------------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"dim": 10, "groups": 3}, r"dim=10 is not divisible by groups=3"),
    ({"method": "ste"}, r"method='ste' quantizes hard .* not with regularizer='knn_ce'; set regularizer='none'"),
    ({"method": "rotation", "regularizer": "perplexity"}, r"not with regularizer='perplexity'"),
    ({"method": "simvq", "regularizer": "knn_l2"}, r"method='simvq' quantizes hard"),
    ({"method": "gumbel"}, r"method='gumbel' is not one of softmax, soft_gumbel, hard_gumbel, ste, rotation, simvq"),
    ({"regularizer": "knn"}, r"regularizer='knn' is not one of knn_ce, knn_l2, perplexity, none"),
    ({"distance": "manhattan"}, r"distance='manhattan' is not one of cosine, euclid"),
    ({"inference": "argmax"}, r"inference='argmax' is not one of hard, soft"),
    ({"regularizer_weight": -0.1}, r"regularizer_weight must be >= 0, got -0.1"),
    ({"regularizer_weight": float("nan")}, r"regularizer_weight must be >= 0, got nan"),
    ({"method": "ste", "regularizer": "none", "commitment_weight": -1.0}, r"commitment_weight must be >= 0, got -1.0"),
    ({"method": "softmax", "regularize_samples": True}, r"regularize_samples=True only applies to Gumbel methods"),
    ({"method": "ste", "regularizer": "none", "inference": "soft"}, r"inference='soft' needs a smoothing method"),
    ({"dim": 0}, r"dim must be a positive integer, got 0"),
    ({"codebook_size": 2.5}, r"codebook_size must be a positive integer, got 2.5"),
    ({"groups": True}, r"groups must be a positive integer, got True"),
    ({"knn_k": 0}, r"knn_k must be a positive integer, got 0"),
    ({"init_temperature": 0.0}, r"init_temperature must be > 0, got 0.0"),
    ({"min_temperature": -1.0}, r"min_temperature must be > 0, got -1.0"),
    ({"init_temperature": 1e-4}, r"init_temperature=0.0001 is below min_temperature=0.001"),
    ({"gumbel_temperature": GumbelTemperature(decay=1.5)}, r"gumbel_temperature needs .* 0 < decay <= 1"),
    ({"gumbel_temperature": {"start": 0.0}}, r"gumbel_temperature needs start > 0"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_CONFIGS)
def test_invalid_config_is_rejected(fields, message):
    kwargs = {"dim": 8, "codebook_size": 4, **fields}
    with pytest.raises(ValueError, match=message):
        QuantizerConfig(**kwargs)


def test_invalid_config_is_rejected_when_building_from_a_name():
    with pytest.raises(ValueError, match=r"regularize_samples=True only applies to Gumbel methods"):
        build_quantizer("softmax-knn_ce", dim=8, codebook_size=4, regularize_samples=True)
    with pytest.raises(ValueError, match=r"inference='soft' needs a smoothing method"):
        build_quantizer("ste-euclid", dim=8, codebook_size=4, inference="soft")


def test_config_mutated_after_construction_is_revalidated_by_the_quantizer():
    config = QuantizerConfig(dim=8, codebook_size=4)
    config.groups = 3
    with pytest.raises(ValueError, match=r"dim=8 is not divisible by groups=3"):
        ProductQuantizer(config)


def test_valid_edge_configs_are_accepted():
    """Boundary values that must *not* be rejected (so the checks above are not over-eager)."""
    QuantizerConfig(dim=8, codebook_size=1, regularizer_weight=0.0)
    QuantizerConfig(dim=8, codebook_size=4, method="ste", regularizer="none", commitment_weight=0.0)
    QuantizerConfig(dim=8, codebook_size=4, method="soft_gumbel", regularize_samples=True)
    QuantizerConfig(dim=8, codebook_size=4, init_temperature=1e-3)
    QuantizerConfig(dim=8, codebook_size=4, gumbel_temperature=GumbelTemperature(start=2.0, end=0.5, decay=1.0))
    QuantizerConfig(dim=8, codebook_size=4, method="hard_gumbel", inference="soft")


# --------------------------------------------------------------------------------------------------------------
# The paper's method list and the traits of a name
# --------------------------------------------------------------------------------------------------------------


def test_paper_methods_are_the_tables_rows_in_order():
    """Tables 1 and 2: STE and RE with Euclid / Cosine, then H-Gmb, S-Gmb, Softmax with PPL, KNN-L2, KNN-CE."""
    rows = simplexvq.paper_methods("table1")
    assert rows == simplexvq.paper_methods("table2") == simplexvq.PAPER_METHODS
    assert len(rows) == len(set(rows)) == 13 and set(rows) <= set(available_quantizers())
    configs = [quantizer_config(name, dim=DIM, codebook_size=CODEBOOK_SIZE) for name in rows]
    hard = [(c.method, c.distance) for c in configs[:4]]
    assert hard == [("ste", "euclid"), ("ste", "cosine"), ("rotation", "euclid"), ("rotation", "cosine")]
    smoothed = [(c.method, c.regularizer) for c in configs[4:]]
    assert smoothed == [
        (method, regularizer)
        for method in ("hard_gumbel", "soft_gumbel", "softmax")
        for regularizer in ("perplexity", "knn_l2", "knn_ce")
    ]
    assert simplexvq.paper_methods(include_simvq=True) == (*rows, "simvq")
    with pytest.raises(ValueError, match="table must be 'table1' or 'table2', got 'table3'"):
        simplexvq.paper_methods("table3")


@pytest.mark.parametrize("name", registry.built_in_quantizers())
def test_traits_agree_with_the_preset_config(name):
    traits = simplexvq.quantizer_traits(name)
    config = quantizer_config(name, dim=DIM, codebook_size=CODEBOOK_SIZE)
    assert traits.built_in
    assert traits.smoothing == config.is_smoothing
    assert traits.gumbel == (config.method in ("soft_gumbel", "hard_gumbel"))
    assert traits.knn == (config.regularizer in ("knn_ce", "knn_l2"))
    assert traits.regularizer == config.regularizer


def test_traits_of_third_party_and_unknown_names():
    register_quantizer("test-traits-third-party", overwrite=True)(lambda **kwargs: nn.Identity())
    traits = simplexvq.quantizer_traits("test-traits-third-party")
    assert not (traits.built_in or traits.smoothing or traits.gumbel or traits.knn) and traits.regularizer is None
    with pytest.raises(KeyError, match="Did you mean 'softmax-knn_ce'"):
        simplexvq.quantizer_traits("softmax-knn-ce")

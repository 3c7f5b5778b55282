"""QuantizerSpec: one quantizer section (method name + options) generated from QuantizerConfig."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

import simplexvq
from simplexvq import QuantizerConfig, QuantizerSpec
from simplexvq.spec import ADAPTER_FIELDS, NAME_FIELDS, OPTION_NAMES


def test_every_config_option_is_a_spec_field():
    config_fields = {f.name for f in dataclasses.fields(QuantizerConfig)}
    assert set(OPTION_NAMES) == config_fields - set(NAME_FIELDS) - set(ADAPTER_FIELDS)
    spec_fields = {f.name for f in dataclasses.fields(QuantizerSpec)}
    assert spec_fields == {"method", "extra_options", *OPTION_NAMES}


def test_spec_builds_the_same_quantizer_as_the_registry():
    torch.manual_seed(0)
    from_spec = QuantizerSpec(method="softmax-knn_l2", knn_k=3, chunk_size=5).build(dim=8, codebook_size=6)
    torch.manual_seed(0)
    direct = simplexvq.build_quantizer("softmax-knn_l2", dim=8, codebook_size=6, knn_k=3, chunk_size=5)
    assert from_spec.config == direct.config
    assert torch.equal(from_spec.codebook.weight, direct.codebook.weight)
    assert simplexvq.build_quantizer(QuantizerSpec(method="simvq"), dim=8, codebook_size=6).config.method == "simvq"


def test_unset_options_keep_the_method_defaults():
    config = QuantizerSpec(method="simvq").config(dim=8, codebook_size=4)
    assert config == simplexvq.quantizer_config("simvq", dim=8, codebook_size=4)
    assert config.distance == "euclid" and config.commitment_weight == 0.25


def test_yaml_round_trip_and_command_line_overrides():
    @dataclasses.dataclass
    class Section:
        quantizer: QuantizerSpec = dataclasses.field(default_factory=QuantizerSpec)

    merged = OmegaConf.merge(
        OmegaConf.structured(Section),
        OmegaConf.create({"quantizer": {"method": "hard_gumbel-knn_ce", "knn_scope": "global"}}),
        OmegaConf.from_dotlist(["quantizer.knn_k=3", "quantizer.gumbel_temperature.start=2.0"]),
    )
    spec = OmegaConf.to_object(merged).quantizer
    assert spec.method == "hard_gumbel-knn_ce" and spec.knn_k == 3 and spec.knn_scope == "global"
    assert spec.gumbel_temperature.start == 2.0
    assert QuantizerSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(Exception, match="knn_kk"):
        OmegaConf.merge(OmegaConf.structured(Section), OmegaConf.from_dotlist(["quantizer.knn_kk=3"]))


def test_bad_specs_get_the_core_messages():
    with pytest.raises(KeyError, match="Did you mean 'softmax-knn_ce'"):
        QuantizerSpec(method="softmax-knnce").validate()
    with pytest.raises(ValueError, match="knn_k must be a positive integer"):
        QuantizerSpec(knn_k=0).validate()
    with pytest.raises(ValueError, match="regularizer='none'"):
        QuantizerSpec(method="ste-euclid", knn_scope="global").validate()
    with pytest.raises(ValueError, match="unknown quantizer option 'knn'. Did you mean 'knn_k'"):
        QuantizerSpec.from_dict({"method": "softmax-knn_ce", "knn": 2})
    with pytest.raises(ValueError, match="leave quantizer.groups unset"):
        QuantizerSpec(groups=2).build(dim=8, codebook_size=4, groups=1)
    with pytest.raises(ValueError, match="third-party"):
        QuantizerSpec(extra_options={"beta": 1.0}).validate()


def test_third_party_quantizers_take_extra_options():
    received = {}

    @simplexvq.register_quantizer("test-spec-third-party", overwrite=True)
    def build(**kwargs):
        received.update(kwargs)
        return torch.nn.Identity()

    QuantizerSpec(method="test-spec-third-party", extra_options={"beta": 0.5}).build(dim=4)
    assert received == {"beta": 0.5, "dim": 4}

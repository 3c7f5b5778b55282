"""The fairseq2 extension: the ``wav2vec2_simplexvq`` family through fairseq2's own APIs.

fairseq2 only logs a warning when an extension fails, so the module fixture initialises fairseq2 with
``FAIRSEQ2_EXTENSION_TRACE=1`` (a failing extension raises) and asserts that the family resolves (which also
catches an entry point that is not installed); the checkpoint test repeats both in a fresh process.

The gradient tests compare the injected auxiliary gradient with the gradient of the explicit loss
``aggregate + aux_loss * num_targets`` (``docs/fairseq2.md``), also under a loss scaler.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import textwrap

import fairseq2
import pytest
import torch
from fairseq2.checkpoint import ModelMetadataDumper, StandardCheckpointManager
from fairseq2.device import CPU
from fairseq2.error import InvalidOperationError
from fairseq2.file_system import FileSystem
from fairseq2.gang import create_fake_gangs
from fairseq2.io import TensorFileDumper, TensorFileLoader
from fairseq2.models import ModelArchitectureNotKnownError, ModelFamily
from fairseq2.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
from fairseq2.models.wav2vec2.asr import get_wav2vec2_asr_model_hub
from fairseq2.nn import BatchLayout
from fairseq2.nn.utils.module import to_device
from fairseq2.runtime.config_registry import get_config
from fairseq2.runtime.dependency import DependencyContainer, DependencyResolver, get_dependency_resolver
from fairseq2.utils.config import ConfigMerger
from fairseq2.utils.structured import ValueConverter
from fairseq2.utils.threading import ThreadPool
from fairseq2.utils.validation import StandardObjectValidator, ValidationError

import simplexvq
from simplexvq.fairseq2_extension import (
    SIMPLEXVQ_WAV2VEC2_FAMILY,
    TINY_ASR_ARCH,
    QuantizerSection,
    SimplexVQQuantizerOutput,
    SimplexVQWav2Vec2Config,
    SimplexVQWav2Vec2Quantizer,
    get_simplexvq_wav2vec2_model_hub,
    setup_simplexvq_extension,
)
from simplexvq.spec import OPTION_NAMES

TABLE_2_METHODS = [
    "ste-euclid",
    "ste-cosine",
    "rotation-euclid",
    "rotation-cosine",
    "hard_gumbel-perplexity",
    "hard_gumbel-knn_l2",
    "hard_gumbel-knn_ce",
    "soft_gumbel-perplexity",
    "soft_gumbel-knn_l2",
    "soft_gumbel-knn_ce",
    "softmax-perplexity",
    "softmax-knn_l2",
    "softmax-knn_ce",
    "simvq",
]
WAVE = (2, 4000)  # two one-quarter-second waveforms at 16 kHz: ~200 frames, ~100 masked per row for `tiny`


@pytest.fixture(scope="module")
def resolver() -> DependencyResolver:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FAIRSEQ2_EXTENSION_TRACE", "1")  # a failing extension raises instead of logging a warning
        try:
            resolver = fairseq2.init_fairseq2(no_progress=True)
        except InvalidOperationError:  # another test module of this process initialised fairseq2 first
            resolver = get_dependency_resolver()
    family = resolver.maybe_resolve(ModelFamily, key=SIMPLEXVQ_WAV2VEC2_FAMILY)
    assert family is not None, "the simplexvq fairseq2 extension did not register its model family"
    return resolver


@pytest.fixture(scope="module")
def hub(resolver):
    return get_simplexvq_wav2vec2_model_hub()


def tiny(hub, **quantizer_overrides) -> SimplexVQWav2Vec2Config:
    config = hub.get_arch_config("tiny")
    config.quantizer = dataclasses.replace(config.quantizer, **quantizer_overrides)
    return config


def tiny_model(hub, **quantizer_overrides) -> Wav2Vec2Model:
    torch.manual_seed(0)
    model = hub.create_new_model(tiny(hub, **quantizer_overrides), device=CPU)
    model.train()
    return model


def run(model: Wav2Vec2Model, seed: int = 1, *, step: int | None = None, seq_lens: list[int] | None = None, **weights):
    """One forward pass on a fixed random batch; the same seed gives the same masks, distractors and Gumbel noise,
    and ``step`` sets the quantizer's step counter (the Gumbel temperature) first."""
    generator = torch.Generator().manual_seed(1234)
    waves = torch.randn(WAVE, generator=generator)
    if step is not None:
        model.quantizer.num_updates.fill_(step)
    torch.manual_seed(seed)
    return model(waves, BatchLayout.of(waves, seq_lens=seq_lens), **weights)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Registration and resolution by name
# ----------------------------------------------------------------------------------------------------------------


def test_registration_into_a_fresh_container_and_no_silent_double_registration():
    container = DependencyContainer()
    setup_simplexvq_extension(container)
    assert SIMPLEXVQ_WAV2VEC2_FAMILY in set(container.iter_keys(ModelFamily))
    assert {"base_knn_1x1024", "base_knn_2x320", "tiny"} <= set(container.iter_keys(SimplexVQWav2Vec2Config))
    with pytest.raises(InvalidOperationError):
        setup_simplexvq_extension(container)


def test_family_and_archs_resolve_by_name(resolver, hub):
    family = resolver.resolve(ModelFamily, key=SIMPLEXVQ_WAV2VEC2_FAMILY)
    assert family.name == SIMPLEXVQ_WAV2VEC2_FAMILY
    assert family.kls is Wav2Vec2Model and family.config_kls is SimplexVQWav2Vec2Config
    assert family.supports_fsdp and family.supports_layerwise_ac
    assert {"base_knn_1x1024", "base_knn_2x320", "tiny"} <= family.get_archs()

    base = get_config(resolver, Wav2Vec2Config, "base")  # fairseq2's own BASE arch
    for arch, groups, entries, codebook_dim in (("base_knn_1x1024", 1, 1024, 256), ("base_knn_2x320", 2, 320, 128)):
        config = hub.get_arch_config(arch)
        assert isinstance(config, SimplexVQWav2Vec2Config)
        assert (config.num_codebooks, config.num_codebook_entries) == (groups, entries)
        assert config.quantized_dim // config.num_codebooks == codebook_dim
        assert config.encoder_config == base.encoder_config
        assert config.quantizer.method == "softmax-knn_ce"
    with pytest.raises(ModelArchitectureNotKnownError):
        hub.get_arch_config("base_knn_3x7")


@pytest.mark.parametrize(
    ("arch", "codebook_shape"), [("base_knn_1x1024", (1, 1024, 256)), ("base_knn_2x320", (2, 320, 128))]
)
def test_paper_archs_build_on_the_meta_device(hub, arch, codebook_shape):
    model = hub.create_new_model(hub.get_arch_config(arch), device=CPU, meta=True)
    quantizer = model.quantizer
    assert isinstance(quantizer, SimplexVQWav2Vec2Quantizer)
    assert quantizer.core.codebook.weight.shape == codebook_shape
    assert quantizer.input_proj.weight.shape == (256, 512)  # CNN features (512) -> G x codebook_dim
    assert quantizer.output_dim == 256 and model.final_target_proj.input_dim == 256
    assert all(state.is_meta for state in model.state_dict().values())


def test_meta_materialisation_initialises_the_quantizer(hub):
    model = hub.create_new_model(tiny(hub), device=CPU, meta=True)
    to_device(model, CPU)  # fairseq2's materialisation: to_empty, then reset_parameters() module by module
    core = model.quantizer.core
    torch.testing.assert_close(core.logits.temperature, torch.full((2,), 0.1))
    weight = core.codebook.weight
    assert torch.isfinite(weight).all() and 0.5 < weight.std().item() * math.sqrt(8) < 2.0
    model.train()
    loss, _ = run(model)
    assert torch.isfinite(loss.aggregate)


def test_config_validation_through_fairseq2(hub):
    validator = StandardObjectValidator()
    validator.validate(tiny(hub))
    for overrides in ({"method": "softmax-knn_cee"}, {"method": "ste-euclid", "inference": "soft"}):
        with pytest.raises(ValidationError):
            validator.validate(tiny(hub, **overrides))


def test_recipe_config_overrides_select_the_method_by_name(resolver, hub):
    """``model: {family: wav2vec2_simplexvq, arch: ..., config_overrides: ...}`` as fairseq2's recipes apply it."""
    converter = resolver.resolve(ValueConverter)
    overrides = {"num_codebooks": 1, "quantized_dim": 8, "quantizer": {"method": "simvq"}}
    merged = resolver.resolve(ConfigMerger).merge(converter.unstructure(hub.get_arch_config("tiny")), overrides)
    config = converter.structure(merged, SimplexVQWav2Vec2Config)
    StandardObjectValidator().validate(config)
    assert config.quantizer.method == "simvq" and config.quantizer.knn_k == 2  # untouched fields keep the arch's
    core = hub.create_new_model(config, device=CPU, meta=True).quantizer.core
    assert core.config.method == "simvq" and core.codebook.basis.shape == (1, 16, 8)


# ----------------------------------------------------------------------------------------------------------------
# Forward / backward of every Table 2 method
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", TABLE_2_METHODS)
def test_forward_backward_of_every_table_2_method(hub, method):
    model = tiny_model(hub, method=method)
    loss, output = run(model)
    for name in ("aggregate", "contrastive", "diversity", "features_penalty"):
        assert torch.isfinite(getattr(loss, name)), name
    loss.aggregate.backward()
    for name, param in model.quantizer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name  # DDP: every parameter, every step
        assert param.grad.abs().sum() > 0, name

    qout = output.quantizer_output
    assert isinstance(qout, SimplexVQQuantizerOutput)
    batch, masked = output.logits.shape[:2]
    groups, entries = 2, 16
    assert qout.quantized_vectors.shape == (batch, masked, 16)
    assert qout.cb.shape == (batch * masked, groups * entries)
    assert torch.equal(qout.cb.sum(dim=1), torch.full((batch * masked,), float(groups)))  # one-hot per group
    assert torch.equal(qout.cb.view(-1, groups, entries).argmax(-1), qout.indices.view(-1, groups))
    assert 1.0 <= qout.code_perplexity.item() <= groups * entries
    assert 1.0 <= qout.prob_perplexity.item() <= groups * entries
    assert not qout.prob_perplexity.requires_grad and not loss.diversity.requires_grad  # diversity term inert
    assert torch.isfinite(qout.aux_loss) and not qout.aux_loss.requires_grad  # injected, so detached
    expected_temperature = {"hard_gumbel": 2.0, "soft_gumbel": 2.0, "softmax": 0.1}.get(method.split("-")[0], 0.0)
    assert qout.temperature == pytest.approx(expected_temperature)  # Gumbel start / logit temperature / hard

    model.eval()
    with torch.no_grad():
        _, output = run(model)
    assert torch.isfinite(output.quantizer_output.aux_loss)
    assert int(model.quantizer.num_updates) == 1  # training forward passes only


def test_gumbel_temperature_follows_the_persistent_step_counter(hub):
    model = tiny_model(hub, method="hard_gumbel-knn_ce")
    start, end, decay = model.quantizer.codebook_sampling_temperature
    seen = [run(model)[1].quantizer_output.temperature for _ in range(3)]
    model.quantizer.num_updates.fill_(10**9)
    seen.append(run(model)[1].quantizer_output.temperature)
    assert seen == pytest.approx([start, start * decay, start * decay**2, end])


def test_padding_never_reaches_the_quantizer(hub):
    model = tiny_model(hub)
    lengths = [WAVE[1], 2600]
    captured = {}
    model.quantizer.register_forward_hook(lambda module, args, out: captured.update(x=args[0]))
    loss, output = run(model, seq_lens=lengths)
    num_frames = output.encoder_output_layout.seq_lens
    assert num_frames[1] < num_frames[0]
    for row, length in enumerate(num_frames):
        assert not output.temporal_mask[row, length:].any()  # masked positions lie inside the row
    assert captured["x"].shape[:2] == output.logits.shape[:2]  # same number per row: no padding needed
    assert torch.isfinite(loss.aggregate)


# ----------------------------------------------------------------------------------------------------------------
# The injected gradient
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["softmax-knn_ce", "hard_gumbel-knn_ce", "hard_gumbel-perplexity", "ste-cosine"])
def test_injected_gradient_equals_the_explicit_loss_gradient(hub, method):
    model = tiny_model(hub, method=method)

    loss, _ = run(model, step=0)
    loss.aggregate.backward()
    injected = grads(model)

    model.quantizer.inject_aux_loss = False
    loss, output = run(model, step=0)
    aux_loss = output.quantizer_output.aux_loss
    num_targets = math.prod(output.logits.shape[:2])
    assert aux_loss.requires_grad and aux_loss.item() > 0
    (loss.aggregate + aux_loss * num_targets).backward()
    explicit = grads(model)

    loss, _ = run(model, step=0)
    loss.aggregate.backward()
    without = grads(model)

    assert_same_grads(injected, explicit)
    differs = [name for name in explicit if not torch.allclose(explicit[name], without[name], rtol=1e-3, atol=1e-5)]
    assert "quantizer.input_proj.weight" in differs  # the regularizer really contributes


def test_injected_gradient_follows_the_loss_scale(hub):
    model = tiny_model(hub, method="softmax-knn_ce")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # what fairseq2's fp16 loss scaler does

    loss, _ = run(model, step=0)
    scaler.scale(loss.aggregate).backward()
    assert scaler.get_scale() == 2.0**10
    scaler.unscale_(optimizer)
    scaled = grads(model)

    loss, _ = run(model, step=0)
    (loss.aggregate / 4).backward()  # e.g. averaging over gradient-accumulation batches
    quarter = grads(model)

    model.quantizer.inject_aux_loss = False
    loss, output = run(model, step=0)
    (loss.aggregate + output.quantizer_output.aux_loss * math.prod(output.logits.shape[:2])).backward()
    explicit = grads(model)

    assert_same_grads(scaled, explicit)
    assert_same_grads({name: 4 * grad for name, grad in quarter.items()}, explicit)


def test_diversity_term_is_inert(hub):
    model = tiny_model(hub, method="softmax-knn_ce")
    loss, _ = run(model, step=0, diversity_weight=0.0)
    loss.aggregate.backward()
    zero = grads(model)
    loss, _ = run(model, step=0, diversity_weight=100.0)
    loss.aggregate.backward()
    assert loss.diversity > 0  # still reported, as a metric
    assert_same_grads(grads(model), zero)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints through fairseq2
# ----------------------------------------------------------------------------------------------------------------

LOAD_BY_NAME = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import simplexvq

    core_only = sorted(name for name in sys.modules if "fairseq2" in name)  # the core never imports fairseq2

    import torch
    import fairseq2
    from fairseq2.composition import register_checkpoint_models
    from fairseq2.device import CPU
    from fairseq2.models import load_model

    from simplexvq.fairseq2_extension import get_simplexvq_wav2vec2_model_hub

    checkpoint_dir, out = Path(sys.argv[1]), sys.argv[2]
    fairseq2.init_fairseq2(extras=lambda c: register_checkpoint_models(c, checkpoint_dir), no_progress=True)
    model = load_model("last_checkpoint", device=CPU)
    config = get_simplexvq_wav2vec2_model_hub().get_model_config("last_checkpoint")
    kind = type(model.quantizer).__name__
    torch.save({"state": model.state_dict(), "config": repr(config), "kind": kind, "core_only": core_only}, out)
    """
)


def test_checkpoint_round_trip_through_fairseq2(resolver, hub, tmp_path):
    config = tiny(hub, method="hard_gumbel-knn_ce", knn_k=3)
    torch.manual_seed(0)
    model = hub.create_new_model(config, device=CPU)
    model.train()
    for seed in range(3):  # advance the Gumbel step counter, a persistent buffer
        run(model, seed=seed)
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    assert int(expected["quantizer.num_updates"]) == 3

    checkpoint_dir = tmp_path / "checkpoints"
    manager = StandardCheckpointManager(
        tmp_path,
        create_fake_gangs(CPU),
        resolver.resolve(FileSystem),
        resolver.resolve(TensorFileLoader),
        resolver.resolve(TensorFileDumper),
        resolver.resolve(ThreadPool),
    )
    manager.save_model_only(3, model, blocking=True)  # as fairseq2's trainer saves it
    resolver.resolve(ModelMetadataDumper).dump(checkpoint_dir, SIMPLEXVQ_WAV2VEC2_FAMILY, config)  # model.yaml

    loaded = hub.load_custom_model(checkpoint_dir / "step_3" / "model", config, device=CPU)
    assert loaded.state_dict().keys() == expected.keys()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    loaded.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(run(loaded)[1].quantizer_output.indices, run(model)[1].quantizer_output.indices)

    # A fresh process (after checking that `import simplexvq` imports no fairseq2) finds the family, the config and
    # the weights from the checkpoint directory alone.
    out = tmp_path / "loaded.pt"
    env = {**os.environ, "FAIRSEQ2_EXTENSION_TRACE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_BY_NAME, str(checkpoint_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = torch.load(out, weights_only=True)
    assert reloaded["core_only"] == []
    assert reloaded["kind"] == "SimplexVQWav2Vec2Quantizer"
    assert reloaded["config"] == repr(config)
    assert reloaded["state"].keys() == expected.keys()
    for name, value in reloaded["state"].items():
        assert torch.equal(value, expected[name]), name


# ----------------------------------------------------------------------------------------------------------------
# Every core option through fairseq2's config_overrides; the loss report; the ASR arch; decode
# ----------------------------------------------------------------------------------------------------------------

CORE_OPTIONS = {  # option -> (method, value): one valid non-default setting of each QuantizerConfig option
    "distance": ("softmax-knn_ce", "euclid"),
    "knn_k": ("softmax-knn_ce", 3),
    "regularizer_weight": ("softmax-knn_l2", 0.5),
    "regularize_samples": ("hard_gumbel-knn_ce", True),
    "commitment_weight": ("ste-euclid", 0.3),
    "init_temperature": ("softmax-knn_ce", 0.2),
    "learnable_temperature": ("softmax-knn_ce", False),
    "min_temperature": ("softmax-knn_ce", 1e-4),
    "inference": ("softmax-knn_ce", "soft"),
    "codebook_init_std": ("softmax-knn_ce", 0.3),
    "knn_scope": ("softmax-knn_ce", "global"),
    "memory_efficient": ("softmax-knn_ce", True),
    "chunk_size": ("softmax-knn_ce", 7),
    "vertex_subsample": ("softmax-knn_ce", 4),
    "backend": ("softmax-knn_ce", "reference"),
    "streamed_precision": ("softmax-knn_ce", "fp32"),
}
FIXED_BY_THE_MODEL = {"codebook_size", "groups", "gumbel_temperature"}


def structured(resolver, hub, overrides: dict) -> SimplexVQWav2Vec2Config:
    """The tiny arch with ``config_overrides`` applied and structured as fairseq2's recipes do."""
    converter = resolver.resolve(ValueConverter)
    merged = resolver.resolve(ConfigMerger).merge(converter.unstructure(hub.get_arch_config("tiny")), overrides)
    return converter.structure(merged, SimplexVQWav2Vec2Config)


def test_every_core_option_is_in_the_family_config(resolver, hub):
    """The section is the core's spec: whatever QuantizerConfig gains appears in the family's YAML."""
    section = resolver.resolve(ValueConverter).unstructure(hub.get_arch_config("tiny"))["quantizer"]
    assert set(OPTION_NAMES) | {"method", "extra_options"} == set(section)
    assert set(CORE_OPTIONS) | FIXED_BY_THE_MODEL == set(OPTION_NAMES), "give each new core option a case above"


@pytest.mark.parametrize("option", sorted(CORE_OPTIONS))
def test_each_core_option_reaches_the_quantizer_through_config_overrides(resolver, hub, option):
    method, value = CORE_OPTIONS[option]
    config = structured(resolver, hub, {"quantizer": {"method": method, option: value}})
    StandardObjectValidator().validate(config)
    core = hub.create_new_model(config, device=CPU, meta=True).quantizer.core
    assert getattr(core.config, option) == value
    assert (core.config.groups, core.config.codebook_size, core.config.dim) == (2, 16, 16)  # from the model


def test_options_the_model_fixes_and_invalid_ones_fail_validation_with_the_core_message(resolver, hub):
    cases = {
        "groups": ({"groups": 4}, "leave quantizer.groups unset"),
        "gumbel_temperature": ({"gumbel_temperature": {"start": 3.0}}, "leave quantizer.gumbel_temperature unset"),
        "scope": ({"method": "ste-euclid", "knn_scope": "global"}, "use regularizer='knn_ce' or 'knn_l2'"),
        "subsample": ({"vertex_subsample": 17}, "vertex_subsample=17 exceeds codebook_size=16"),
        "typo": ({"method": "softmax-knnce"}, "Did you mean 'softmax-knn_ce'"),
    }
    for section, message in cases.values():
        config = structured(resolver, hub, {"quantizer": section})
        with pytest.raises(ValidationError, match=re.escape(message)):
            StandardObjectValidator().validate(config)


def test_a_plain_core_spec_is_accepted():
    config = SimplexVQWav2Vec2Config(quantizer=simplexvq.QuantizerSpec(method="simvq", knn_k=2))
    assert isinstance(config.quantizer, QuantizerSection) and config.quantizer.method == "simvq"
    StandardObjectValidator().validate(config)
    with pytest.raises(TypeError, match="must be a simplexvq.QuantizerSpec, got dict"):
        SimplexVQWav2Vec2Config(quantizer={"method": "simvq"})


@pytest.mark.parametrize("method", ["softmax-knn_ce", "ste-cosine"])
def test_the_quantizer_loss_is_reported_as_diversity_and_in_the_aggregate(hub, method):
    """What fairseq2's wav2vec2 recipe logs (``diversity_loss``, ``loss``) shows the quantizer's loss; the gradient
    is the one without the report."""
    reported = tiny_model(hub, method=method)
    loss, output = run(reported, step=0, diversity_weight=0.7, features_penalty_weight=3.0)
    num_targets = math.prod(output.logits.shape[:2])
    aux = output.quantizer_output.aux_loss
    assert aux.item() > 0
    torch.testing.assert_close(loss.diversity, aux * num_targets)
    torch.testing.assert_close(loss.aggregate, loss.contrastive + aux * num_targets + 3.0 * loss.features_penalty)
    loss.aggregate.backward()
    with_report = grads(reported)

    reported.eval()  # validation: the recipe's valid metrics report the quantizer's loss the same way
    with torch.no_grad():
        loss, output = run(reported, step=0)
    eval_aux = output.quantizer_output.aux_loss
    assert eval_aux.item() > 0
    torch.testing.assert_close(loss.diversity, eval_aux * math.prod(output.logits.shape[:2]))

    plain_config = tiny(hub, method=method)
    plain_config.aux_loss_as_diversity = False
    torch.manual_seed(0)
    plain = hub.create_new_model(plain_config, device=CPU)
    plain.train()
    loss, output = run(plain, step=0, diversity_weight=0.7, features_penalty_weight=3.0)
    expected_diversity = (1 - output.quantizer_output.prob_perplexity / 32) * num_targets  # fairseq2's own term
    torch.testing.assert_close(loss.diversity, expected_diversity)
    loss.aggregate.backward()
    assert_same_grads(with_report, grads(plain))


def test_tiny_asr_arch_fine_tunes_a_tiny_checkpoint(resolver, hub):
    """fairseq2's ASR recipe shares the SSL model's frontend and encoder with ``model.arch=simplexvq_tiny``; its
    masking (on in training) fits the width of 32, where fairseq2's default spatial span (64) cannot."""
    asr_hub = get_wav2vec2_asr_model_hub()
    assert TINY_ASR_ARCH in resolver.resolve(ModelFamily, key="wav2vec2_asr").get_archs()
    ssl = tiny_model(hub)
    asr_config = asr_hub.get_arch_config(TINY_ASR_ARCH)
    assert asr_config.encoder_config.model_dim == hub.get_arch_config("tiny").encoder_config.model_dim
    torch.manual_seed(0)
    asr = asr_hub.create_new_model(asr_config, device=CPU)
    asr.encoder_frontend.load_state_dict(ssl.encoder_frontend.state_dict())  # strict: same shapes and names
    asr.encoder.load_state_dict(ssl.encoder.state_dict())
    asr.train()
    waves = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(1, asr_config.target_vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = asr(waves, BatchLayout.of(waves), targets, BatchLayout.of(targets))
    assert torch.isfinite(loss)
    loss.backward()
    assert asr.final_proj.weight.grad.abs().sum() > 0

    default_masking = dataclasses.replace(asr_config, spatial_mask_span_len=64)
    failing = asr_hub.create_new_model(default_masking, device=CPU).train()
    with pytest.raises(ValueError, match="must be greater than `span_len` \\(64\\)"):
        failing(waves, BatchLayout.of(waves), targets, BatchLayout.of(targets))


def test_decode_through_the_adapter_gives_the_eval_mode_vectors(hub):
    model = tiny_model(hub).eval()
    quantizer = model.quantizer
    assert isinstance(quantizer.core, simplexvq.Quantizer)
    with torch.no_grad():
        out = quantizer(torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(0)))
        decoded = quantizer.decode(out.indices)
    assert decoded.shape == out.quantized_vectors.shape == (2, 9, 16)
    assert torch.equal(decoded, out.quantized_vectors)


def test_a_third_party_quantizer_must_satisfy_the_contract(hub):
    simplexvq.register_quantizer("test-fairseq2-no-decode", overwrite=True)(lambda **kwargs: torch.nn.Identity())
    config = tiny(hub, method="test-fairseq2-no-decode", knn_k=None)
    with pytest.raises(TypeError, match="'test-fairseq2-no-decode' Identity does not satisfy simplexvq.Quantizer"):
        hub.create_new_model(config, device=CPU)

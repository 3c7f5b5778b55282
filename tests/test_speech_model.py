"""wav2vec 2.0 pretraining head: masking, distractors, eq. 15 against a naive reference, the model API."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

import simplexvq
from simplexvq import QuantizerSpec
from simplexvq.spec import OPTION_NAMES

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from quantizer_options import OPTION_VALUES, configured_value, option_value  # noqa: E402

from simplexvq_recipes.speech.pretraining.config import ModelConfig, PretrainConfig, preset_path
from simplexvq_recipes.speech.pretraining.losses import (
    contrastive_logits,
    contrastive_loss,
    feature_penalty,
    scale_gradient,
)
from simplexvq_recipes.speech.pretraining.masking import padding_mask, sample_distractors, span_mask
from simplexvq_recipes.speech.pretraining.model import Wav2Vec2Pretrainer, build_model
from simplexvq_recipes.training.config import load_config

TABLE2_METHODS = [
    "ste-euclid",
    "ste-cosine",
    "rotation-euclid",
    "rotation-cosine",
    *(
        f"{smoothing}-{reg}"
        for smoothing in ("hard_gumbel", "soft_gumbel", "softmax")
        for reg in ("perplexity", "knn_l2", "knn_ce")
    ),
]


def micro_config(**quantizer) -> ModelConfig:
    """A model small enough to run every test in a fraction of a second."""
    return ModelConfig(
        conv_layers=[[16, 10, 5], [16, 3, 2], [16, 3, 2], [16, 3, 2], [16, 3, 2], [16, 2, 2], [16, 2, 2]],
        embed_dim=32,
        num_layers=2,
        num_heads=2,
        ffn_dim=64,
        pos_conv_kernel=8,
        pos_conv_groups=2,
        final_dim=16,
        layer_drop=0.0,  # every layer runs: gradients reach every parameter whatever the RNG
        num_negatives=10,
        codebook_dim=8,
        quantizer=QuantizerSpec(**{"method": "softmax-knn_ce", "codebook_size": 8, "knn_k": 2, **quantizer}),
    )


# ---------------------------------------------------------------------------------------------------------------
# masking and distractors


def test_span_mask_matches_wav2vec2_statistics():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([500, 300, 40])
    masks = [span_mask(lengths, 500, mask_prob=0.065, mask_length=10, generator=generator) for _ in range(300)]
    stacked = torch.stack(masks).float()
    assert not stacked[:, 1, 300:].any() and not stacked[:, 2, 40:].any()  # padding never masked
    # expected masked fraction with overlapping spans: 1 - (1 - p)^L over interior frames, about 49%
    fraction = stacked[:, 0, 20:480].mean().item()
    assert fraction == pytest.approx(1 - (1 - 0.065) ** 10, abs=0.03)
    # masks come in runs of at least mask_length frames
    row = masks[0][0].int()
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int), row, torch.zeros(1, dtype=torch.int)]))
    runs = torch.nonzero(edges == -1).squeeze(1) - torch.nonzero(edges == 1).squeeze(1)
    assert runs.min().item() >= 10
    # at least min_masks spans even when mask_prob * T < 1
    short = span_mask(torch.tensor([12]), 12, mask_prob=0.0, mask_length=10, min_masks=2, generator=generator)
    assert short.sum().item() >= 10
    tiny = span_mask(torch.tensor([3]), 3, mask_prob=0.1, mask_length=10, min_masks=1, generator=generator)
    assert tiny.sum().item() == 2  # one span, shortened to T - 1


def test_span_mask_reproducible_with_generator_and_uses_global_rng_otherwise():
    lengths = torch.tensor([100, 80])
    a = span_mask(lengths, 100, mask_prob=0.1, mask_length=5, generator=torch.Generator().manual_seed(3))
    b = span_mask(lengths, 100, mask_prob=0.1, mask_length=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c = span_mask(lengths, 100, mask_prob=0.1, mask_length=5)
    torch.manual_seed(1)
    assert torch.equal(c, span_mask(lengths, 100, mask_prob=0.1, mask_length=5))


def test_distractors_come_from_the_same_utterance_never_self_and_uniformly():
    counts = torch.tensor([5, 1, 3])
    indices, valid = sample_distractors(counts, 2000, generator=torch.Generator().manual_seed(0))
    assert indices.shape == (9, 2000) and valid.tolist() == [True] * 5 + [False] + [True] * 3
    owner = torch.repeat_interleave(torch.arange(3), counts)
    for row in range(9):
        if not valid[row]:
            assert (indices[row] == row).all()
            continue
        drawn = indices[row]
        assert (owner[drawn] == owner[row]).all() and (drawn != row).all()
        frequencies = torch.bincount(drawn, minlength=9).float()[owner == owner[row]]
        others = frequencies[frequencies > 0]
        assert len(others) == counts[owner[row]] - 1  # every other frame is drawn
        assert (others / 2000 - 1 / len(others)).abs().max() < 0.05


def test_padding_mask():
    assert padding_mask(torch.tensor([2, 4]), 2, 4).tolist() == [[False, False, True, True], [False] * 4]
    assert not padding_mask(None, 2, 3).any()


# ---------------------------------------------------------------------------------------------------------------
# losses against naive references


def test_contrastive_logits_match_naive_eq15():
    torch.manual_seed(0)
    predictions, targets = torch.randn(6, 4), torch.randn(6, 4)
    targets[4] = targets[1]  # a distractor equal to the target must be excluded
    distractors = torch.tensor([[1, 2], [4, 0], [0, 1], [5, 5], [1, 3], [3, 3]])
    valid = torch.tensor([True, True, True, True, True, False])
    logits = contrastive_logits(predictions, targets, distractors, 0.1, valid)
    for i in range(6):
        expected_target = F.cosine_similarity(predictions[i], targets[i], dim=0) / 0.1
        assert logits[i, 0].item() == pytest.approx(expected_target.item(), rel=1e-5)
        for k in range(2):
            j = distractors[i, k].item()
            if not valid[i] or torch.equal(targets[j], targets[i]):
                assert logits[i, 1 + k].item() == -math.inf
            else:
                expected = F.cosine_similarity(predictions[i], targets[j], dim=0) / 0.1
                assert logits[i, 1 + k].item() == pytest.approx(expected.item(), rel=1e-5)
    assert logits[1, 1].item() == -math.inf  # target 4 equals target 1
    loss, accuracy = contrastive_loss(logits)
    naive = torch.stack([-torch.log_softmax(logits[i], dim=0)[0] for i in range(6)]).mean()
    assert loss.item() == pytest.approx(naive.item(), rel=1e-6)
    correct = [logits[i, 0] > logits[i, 1:].max() for i in range(6)]
    assert accuracy.item() == pytest.approx(sum(correct) / 6)


def test_feature_penalty_and_gradient_scaling():
    features = torch.randn(2, 5, 3, requires_grad=True)
    padding = torch.tensor([[False] * 5, [False, False, True, True, True]])
    expected = torch.cat([features[0], features[1, :2]]).pow(2).mean()
    assert feature_penalty(features, padding).item() == pytest.approx(expected.item())
    scaled = scale_gradient(features, 0.1)
    assert torch.equal(scaled, features)
    scaled.sum().backward()
    assert torch.allclose(features.grad, torch.full_like(features, 0.1))


# ---------------------------------------------------------------------------------------------------------------
# the model


def test_presets_follow_table4():
    base = load_config(PretrainConfig, preset_path("base"))
    model = base.model
    assert model.conv_layers == [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2 and model.downsampling == 320
    assert (model.embed_dim, model.num_layers, model.num_heads, model.ffn_dim) == (768, 12, 8, 4096)
    assert (model.dropout, model.layer_drop, model.mask_prob, model.mask_length) == (0.1, 0.05, 0.065, 10)
    assert (model.num_negatives, model.logit_temperature) == (100, 0.1)
    q = model.quantizer
    assert (q.method, q.groups, q.codebook_size, q.knn_k, model.codebook_dim) == ("softmax-knn_ce", 1, 1024, 2, 256)
    model2 = load_config(PretrainConfig, preset_path("base_2x320")).model
    assert (model2.quantizer.groups, model2.quantizer.codebook_size, model2.codebook_dim) == (2, 320, 128)
    assert model2.quantizer_dim == 256
    assert base.data.crop_samples == 250_000 and base.optim.betas == [0.9, 0.99] and base.optim.weight_decay == 0
    assert base.optim.final_lr / base.optim.lr == pytest.approx(0.01)


def test_model_api_components_and_forward():
    torch.manual_seed(0)
    model = build_model(PretrainConfig(model=micro_config(groups=2)))
    assert isinstance(model, Wav2Vec2Pretrainer)
    assert type(model.wav2vec2) is transformers.Wav2Vec2Model
    assert model.mask_embedding is model.wav2vec2.masked_spec_embed
    assert model.quantizer.config.groups == 2 and model.quantizer.config.dim == 16
    waveforms = torch.randn(3, 8000) * 0.1
    lengths = torch.tensor([8000, 6000, 4000])
    out = model(waveforms, lengths)
    frames = model.frame_lengths(lengths)
    assert frames.tolist() == [24, 18, 12]
    assert out.mask.shape == (3, 24) and not out.mask[1, 18:].any() and not out.mask[2, 12:].any()
    assert out.num_masked == int(out.mask.sum()) == out.quantizer.indices.shape[0]
    assert out.quantizer.indices.shape == (out.num_masked, 2)
    assert set(out.losses) == {"contrastive", "feature_penalty", "knn_ce"}
    expected = out.losses["contrastive"] + out.losses["knn_ce"] + 10.0 * out.losses["feature_penalty"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    for name in (
        "wav2vec2.masked_spec_embed",
        "quantizer_input.weight",
        "project_q.weight",
        "final_proj.weight",
        "quantizer.codebook.weight",
        "wav2vec2.feature_extractor.conv_layers.0.conv.weight",
        "wav2vec2.encoder.layers.1.feed_forward.output_dense.weight",
    ):
        parameter = dict(model.named_parameters())[name]
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_encode_codes_and_layers():
    torch.manual_seed(0)
    model = build_model(micro_config()).eval()
    waveforms = torch.randn(2, 8000) * 0.1
    lengths = torch.tensor([8000, 5000])
    with torch.no_grad():
        enc = model.encode(waveforms, lengths, layers=[0, 1, 2])
        alone = model.encode(waveforms[:1], None, layers=[2])
        reference = model.wav2vec2(waveforms[:1], output_hidden_states=True).hidden_states
    assert enc.codes.shape == (2, 24, 1) and enc.lengths.tolist() == [24, 15]
    assert (enc.codes[1, 15:] == -1).all() and (enc.codes[:, :15] >= 0).all() and (enc.codes < 8).all()
    assert set(enc.layers) == {0, 1, 2} and all(v.shape == (2, 24, 32) for v in enc.layers.values())
    torch.testing.assert_close(alone.layers[2], reference[2])  # transformers' own path on unmasked input
    assert (enc.layers[1][1, 15:] == 0).all() and (enc.cnn_features.shape == (2, 24, 16))
    assert alone.padding_mask.shape == (1, 24) and not alone.padding_mask.any()
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        model.encode(waveforms, lengths, layers=[3])
    assert not model.quantizer.training  # encode restores the mode it found
    model.train()
    model.encode(waveforms, lengths)
    assert model.quantizer.training


def test_forward_return_codes_matches_encode():
    torch.manual_seed(0)
    model = build_model(micro_config()).eval()
    waveforms, lengths = torch.randn(2, 8000) * 0.1, torch.tensor([8000, 5000])
    with torch.no_grad():
        out = model(waveforms, lengths, generator=torch.Generator().manual_seed(0), return_codes=True)
        assert torch.equal(out.codes, model.encode(waveforms, lengths).codes)
        again = model(waveforms, lengths, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.mask, again.mask) and out.loss.item() == again.loss.item()


@pytest.mark.parametrize("method", TABLE2_METHODS)
def test_every_table2_quantizer_trains_a_step(method):
    torch.manual_seed(0)
    model = build_model(micro_config(method=method, gumbel_temperature={"start": 2.0, "end": 0.5, "decay": 0.9}))
    model.set_num_updates(10)
    if "gumbel" in method:
        assert model.quantizer.gumbel_temperature == pytest.approx(max(2.0 * 0.9**10, 0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(torch.randn(2, 8000) * 0.1)
    assert torch.isfinite(out.loss)
    expected_terms = (
        {"commitment", "codebook"} if method.split("-")[0] in ("ste", "rotation") else {method.split("-")[1]}
    )
    assert set(out.losses) == {"contrastive", "feature_penalty"} | expected_terms
    out.loss.backward()
    optimizer.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "quantizer.codebook.weight" in changed and "wav2vec2.masked_spec_embed" in changed


def test_a_bad_method_name_gets_the_cores_message():
    with pytest.raises(KeyError, match="Did you mean"):
        build_model(micro_config(method="softmax-knn-ce"))


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Dropout on, same seed: the recomputed forward replays the same dropout masks."""
    config = micro_config()
    config.dropout = config.attention_dropout = 0.2
    waveforms, lengths = torch.randn(2, 8000) * 0.1, torch.tensor([8000, 6000])
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(config)
        if checkpointing:
            model.enable_activation_checkpointing()
        torch.manual_seed(1)
        out = model(waveforms, lengths, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        results.append(
            (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    assert any("encoder.layers" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert list(model.state_dict()) == list(build_model(config).state_dict())  # same keys: checkpoints load


def test_option_values_cover_every_core_option():
    assert set(OPTION_NAMES) <= set(OPTION_VALUES), set(OPTION_NAMES) - set(OPTION_VALUES)


@pytest.mark.parametrize("option", OPTION_NAMES)
def test_every_core_quantizer_option_reaches_the_quantizer_from_the_command_line(option):
    method = "hard_gumbel-knn_ce" if option == "regularize_samples" else "softmax-knn_ce"
    overrides = [f"model.quantizer.method={method}", f"model.quantizer.{option}={OPTION_VALUES[option]}"]
    config = load_config(PretrainConfig, preset_path("tiny"), overrides)
    model = build_model(config)
    expected = option_value(option)
    assert configured_value(model.quantizer.config, option) == expected
    default = simplexvq.quantizer_config(method, dim=64, codebook_size=64)
    assert configured_value(default, option) != expected


def test_quantizer_options_from_yaml_and_the_core_validation(tmp_path):
    yaml = tmp_path / "q.yaml"
    yaml.write_text("model:\n  quantizer:\n    method: softmax-knn_ce\n    memory_efficient: true\n    chunk_size: 9\n")
    model = build_model(load_config(PretrainConfig, yaml, ["model.codebook_dim=8"]))
    assert (model.quantizer.config.memory_efficient, model.quantizer.config.chunk_size) == (True, 9)
    with pytest.raises(ValueError, match="knn_scope='global'"):
        build_model(
            load_config(
                PretrainConfig,
                yaml,
                [
                    "model.quantizer.method=ste-euclid",
                    "model.quantizer.knn_scope=global",
                    "model.quantizer.memory_efficient=null",
                    "model.quantizer.chunk_size=null",
                ],
            )
        )


def test_several_processes_search_neighbours_across_ranks_by_default():
    config = micro_config()
    assert build_model(config, num_processes=2).quantizer.config.knn_scope == "global"
    assert build_model(config, num_processes=1).quantizer.config.knn_scope == "local"
    config.quantizer.knn_scope = "local"
    assert build_model(config, num_processes=2).quantizer.config.knn_scope == "local"  # explicit wins
    assert build_model(micro_config(method="ste-euclid"), num_processes=2).quantizer.config.knn_scope == "local"


def test_feature_grad_mult_scales_every_gradient_reaching_the_cnn_and_nothing_else():
    """The CNN's parameters get ``feature_grad_mult`` times the gradient of an unscaled run (contrastive, quantizer
    and feature-penalty terms alike); the rest of the model gets the same gradient."""
    waveforms, lengths = torch.randn(2, 8000) * 0.1, torch.tensor([8000, 6000])
    grads = []
    for mult in (1.0, 0.25):
        config = micro_config()
        config.feature_grad_mult = mult
        config.dropout = config.attention_dropout = config.input_dropout = config.target_dropout = 0.0
        torch.manual_seed(0)
        model = build_model(config)
        model(waveforms, lengths, generator=torch.Generator().manual_seed(0)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, scaled = grads
    cnn = [n for n in plain if n.startswith("wav2vec2.feature_extractor.")]
    assert cnn and all(plain[n].abs().sum() > 0 for n in cnn)
    for name, grad in plain.items():
        factor = 0.25 if name in cnn else 1.0
        torch.testing.assert_close(scaled[name], factor * grad, rtol=1e-4, atol=1e-7, msg=name)


def test_feature_penalty_is_the_mean_square_of_the_raw_cnn_output():
    torch.manual_seed(0)
    model = build_model(micro_config()).eval()
    waveforms, lengths = torch.randn(2, 8000) * 0.1, torch.tensor([8000, 5000])
    with torch.no_grad():
        out = model(waveforms, lengths, generator=torch.Generator().manual_seed(0))
        raw = model.wav2vec2.feature_extractor(waveforms).transpose(1, 2)  # (B, T, C) before the layer norm
        encoded = model.encode(waveforms, lengths)
    expected = torch.cat([raw[0, :24], raw[1, :15]]).pow(2).mean()
    assert out.losses["feature_penalty"].item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(encoded.cnn_features, raw)


def test_the_recipes_mask_reaches_the_transformer_and_nothing_else_masks_in_training_mode():
    """Masked frames enter the Transformer as the mask embedding (transformers' ``mask_time_indices``); an unmasked
    pass in training mode is not masked by transformers' own SpecAugment (its ``mask_time_prob`` is set)."""
    config = micro_config()
    config.dropout = config.attention_dropout = config.input_dropout = config.target_dropout = 0.0
    torch.manual_seed(0)
    model = build_model(config)
    assert model.wav2vec2.config.mask_time_prob == config.mask_prob > 0
    waveforms = torch.randn(2, 8000) * 0.1
    with torch.no_grad():
        train_mode = model.train().encode(waveforms, layers=[0, 2])
        eval_mode = model.eval().encode(waveforms, layers=[0, 2])
        for layer in (0, 2):
            torch.testing.assert_close(train_mode.layers[layer], eval_mode.layers[layer], rtol=0, atol=0)
        mask = torch.zeros(2, 24, dtype=torch.bool)
        mask[0, 3:13] = True
        hidden = model.wav2vec2(waveforms, mask_time_indices=mask, output_hidden_states=True).hidden_states
        projected = model.wav2vec2.feature_projection(model.wav2vec2.feature_extractor(waveforms).transpose(1, 2))[0]
        projected[mask] = model.mask_embedding
        expected = projected + model.wav2vec2.encoder.pos_conv_embed(projected)
        torch.testing.assert_close(hidden[0], model.wav2vec2.encoder.layer_norm(expected))


def test_old_torchaudio_checkpoints_load_converted_and_resuming_them_is_refused_clearly(tmp_path):
    """A checkpoint of the torchaudio-based encoder (older runs): load_pretrained converts it and gives torchaudio's
    own features; loading it straight into the model (what a resume does) is one clear error."""
    try:
        import torchaudio
    except (ImportError, OSError) as error:  # OSError: a torchaudio build that does not load beside this torch
        pytest.skip(f"torchaudio does not load here: {error}")
    from safetensors.torch import save_file

    from simplexvq_recipes.speech.downstream.export import torchaudio_hyperparameters
    from simplexvq_recipes.speech.pretraining.model import (
        CHECKPOINTS,
        CONFIG_FILE,
        WEIGHTS_FILE,
        convert_torchaudio_state_dict,
        is_torchaudio_layout,
        load_pretrained,
    )
    from simplexvq_recipes.training.config import config_to_yaml

    config = PretrainConfig(model=micro_config())
    torch.manual_seed(0)
    new = build_model(config)
    encoder = torchaudio.models.wav2vec2_model(**torchaudio_hyperparameters(config.model))
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    old_state = {f"wav2vec2.{k}": v for k, v in encoder.state_dict().items()}
    old_state["mask_embedding"] = torch.randn(32)
    old_state.update({k: v for k, v in new.state_dict().items() if not k.startswith("wav2vec2.")})
    assert is_torchaudio_layout(old_state) and not is_torchaudio_layout(new.state_dict())
    assert set(convert_torchaudio_state_dict(old_state)) == set(new.state_dict())

    checkpoint = tmp_path / CHECKPOINTS / "step_00000001"
    checkpoint.mkdir(parents=True)
    (tmp_path / CONFIG_FILE).write_text(config_to_yaml(config))
    save_file({k: v.contiguous() for k, v in old_state.items()}, str(checkpoint / WEIGHTS_FILE))
    (checkpoint / "trainer_state.json").write_text('{"step": 1}')
    model, _ = load_pretrained(checkpoint)
    assert torch.equal(model.mask_embedding.detach(), old_state["mask_embedding"])
    waveforms, lengths = torch.randn(2, 8000) * 0.1, torch.tensor([8000, 5000])
    with torch.no_grad():
        expected, _ = encoder.eval().extract_features(waveforms, lengths)
        encoded = model.encode(waveforms, lengths, layers=[1, 2])
    valid = ~encoded.padding_mask
    for layer in (1, 2):
        torch.testing.assert_close(encoded.layers[layer][valid], expected[layer - 1][valid], rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="torchaudio-based encoder of an older simplexvq_recipes"):
        build_model(config).load_state_dict(old_state)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.crop_samples=0", "data.crop_samples must be > 0, got 0"),
        ("data.sample_rate=0", "data.sample_rate must be > 0, got 0"),
        ("data.batch_size=-1", "data.batch_size must be > 0"),
        ("data.max_tokens=0", "data.max_tokens must be > 0"),
        ("data.crop_samples=500", "data.crop_samples=500 gives fewer than 2 frames"),
        ("model.num_layers=0", "model.num_layers must be > 0"),
        ("model.embed_dim=30", "model.embed_dim \\(30\\) must be a multiple of model.num_heads"),
        ("model.mask_prob=0", "model.mask_prob must be in \\(0, 1\\]"),
        ("model.dropout=1.5", "model.dropout must be in \\[0, 1\\)"),
        ("model.extractor_mode=batch_norm", "model.extractor_mode must be one of group_norm, layer_norm"),
    ],
)
def test_sizes_that_cannot_work_are_refused_when_the_config_loads(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(PretrainConfig, preset_path("tiny"), [override])


def test_a_bad_size_stops_the_command_line_before_the_run_folder_exists(tmp_path, capsys):
    from simplexvq_recipes.speech.pretraining import train
    from simplexvq_recipes.training.cli import run_cli

    out = tmp_path / "run"
    argv = ["--preset", "tiny", f"data.manifest_dir={tmp_path}", f"training.output_dir={out}", "data.crop_samples=0"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train.main(argv))
    assert exit_info.value.code == 2
    assert "data.crop_samples must be > 0" in capsys.readouterr().err
    assert not out.exists()


COMPILED_STEP = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_speech_model import micro_config
from simplexvq_recipes.speech.pretraining.model import build_model

config = micro_config()
config.dropout = config.attention_dropout = config.input_dropout = config.target_dropout = 0.0
waveforms, lengths = torch.randn(2, 8000) * 0.1, torch.tensor([8000, 6000])
results = []
for compiled in (False, True):
    torch.manual_seed(0)
    model = build_model(config)
    model.enable_activation_checkpointing()
    run = torch.compile(model, backend="aot_eager") if compiled else model
    out = run(waveforms, lengths, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
(loss, grads), (compiled_loss, compiled_grads) = results
torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=1e-7)
assert compiled_grads.keys() == grads.keys() and any(n.startswith("wav2vec2.feature_extractor") for n in grads)
for name, grad in grads.items():
    torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
print("compiled step matches", len(grads))
"""


def test_torch_compile_of_the_model_gives_the_eager_loss_and_gradients():
    """``training.compile`` compiles the whole pretrainer (transformers' encoder, the CNN hook, activation
    checkpointing); AOTAutograd without inductor's C++ build keeps it fast. In a subprocess: importing the compiler
    must not happen in the test process before the Triton tests choose its mode."""
    import subprocess

    tests = str(Path(__file__).parent)
    result = subprocess.run([sys.executable, "-c", COMPILED_STEP, tests], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled step matches" in result.stdout

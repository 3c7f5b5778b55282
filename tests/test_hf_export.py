"""Hugging Face export: transformers' Wav2Vec2Model loads the folder offline with the project's own hidden states.

Both sources are tested: the Accelerate recipe's pretrainer, whose encoder is a transformers ``Wav2Vec2Model``
(through the command line on a run folder), and the fairseq2 ``wav2vec2_simplexvq`` family (in memory, and
through the command line on a checkpoint that fairseq2's own checkpoint manager wrote). Tiny models with random
weights are enough: the mapping is what is tested, on a padded batch that is not the export's own check signal.
The export's edges are tested too: where it refuses to write, a vision run, a poisoned fairseq2 checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from simplexvq_recipes.speech.downstream import export, hf_export
from simplexvq_recipes.speech.pretraining.config import PretrainConfig, preset_path
from simplexvq_recipes.speech.pretraining.model import CHECKPOINTS, CONFIG_FILE, WEIGHTS_FILE, build_model
from simplexvq_recipes.training.config import config_to_yaml, load_config

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random waveforms, the second padded after 9000 of 12000 samples."""
    waveforms = torch.randn(2, 12000, generator=torch.Generator().manual_seed(seed))
    lengths = torch.tensor([12000, 9000])
    waveforms[1, 9000:] = 0.0
    return waveforms, lengths


def _load(folder) -> transformers.Wav2Vec2Model:
    return transformers.Wav2Vec2Model.from_pretrained(folder, local_files_only=True).eval()


def _assert_equal_hidden_states(expected, hf_model, waveforms, lengths) -> None:
    actual = hf_export.hf_hidden_states(hf_model, waveforms, lengths)
    frames = hf_model._get_feat_extract_output_lengths(lengths)
    assert len(actual) == len(expected) > 0
    assert frames[1] < actual[0].shape[1]  # the padded row really is shorter
    assert hf_export.max_hidden_state_difference(expected, actual, frames) <= TOLERANCE


def _write_run(run_dir, config: PretrainConfig, model: torch.nn.Module, step: int = 1) -> None:
    """A run folder laid out as the speech recipe writes it (config.yaml, checkpoints/step_*/...)."""
    checkpoint = run_dir / CHECKPOINTS / f"step_{step:08d}"
    checkpoint.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(config_to_yaml(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint / WEIGHTS_FILE))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": step}))
    sizes = {name: (checkpoint / name).stat().st_size for name in (WEIGHTS_FILE, "trainer_state.json")}
    (checkpoint / "manifest.json").write_text(json.dumps(sizes))


def _recipe_model(**model_overrides) -> tuple[PretrainConfig, torch.nn.Module]:
    config = load_config(PretrainConfig, preset_path("tiny"))
    config.model = dataclasses.replace(config.model, **model_overrides)
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():  # non-trivial affine parameters, so a missed mapping cannot hide behind ones and zeros
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return config, model.eval()


# --------------------------------------------------------------------------------------------------------------
# The Accelerate recipe
# --------------------------------------------------------------------------------------------------------------


def test_recipe_run_exports_from_the_command_line(tmp_path, capsys):
    config, model = _recipe_model()
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    _write_run(run_dir, config, model)

    result = hf_export.main([str(run_dir), str(out)])
    assert "transformers.Wav2Vec2Model.from_pretrained" in capsys.readouterr().out
    assert result.quantizer and result.max_difference <= TOLERANCE
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}

    hf_model = _load(out)
    waveforms, lengths = _batch()
    _assert_equal_hidden_states(hf_export.recipe_hidden_states(model, waveforms, lengths), hf_model, waveforms, lengths)
    assert torch.equal(hf_model.masked_spec_embed.detach(), model.mask_embedding.detach())
    preprocessor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(out, local_files_only=True)
    assert preprocessor.sampling_rate == 16000 and not preprocessor.do_normalize


@pytest.mark.parametrize(
    "overrides",
    [
        {"layer_norm_first": True, "extractor_mode": "layer_norm", "conv_bias": True},  # wav2vec 2.0 LARGE's layout
    ],
)
def test_recipe_variants_export_with_equal_hidden_states(tmp_path, overrides):
    _, model = _recipe_model(**overrides)
    result = hf_export.export_recipe_model(model, tmp_path / "hf")
    hf_model = _load(tmp_path / "hf")
    assert hf_model.config.do_stable_layer_norm and hf_model.config.feat_extract_norm == "layer"
    waveforms, lengths = _batch(seed=3)
    _assert_equal_hidden_states(hf_export.recipe_hidden_states(model, waveforms, lengths), hf_model, waveforms, lengths)
    assert result.max_difference <= TOLERANCE


def test_the_quantizer_beside_the_export_gives_the_models_codes(tmp_path):
    _, model = _recipe_model()
    hf_export.export_recipe_model(model, tmp_path / "hf")
    projection, quantizer = hf_export.load_quantizer(tmp_path / "hf")
    assert quantizer.config == model.quantizer.config
    hf_model = _load(tmp_path / "hf")
    waveforms, lengths = _batch(seed=5)
    with torch.no_grad():
        features = hf_model(waveforms).extract_features  # layer-normalised CNN features (the quantizer's input)
        codes = quantizer(projection(features)).indices
        expected = model.encode(waveforms).codes
        assert torch.equal(codes, expected)
        assert torch.equal(quantizer.decode(codes), model.quantizer.decode(expected))


class _ThirdPartyQuantizer(torch.nn.Module):
    """A registered-style quantizer that is not a simplexvq.ProductQuantizer (it wraps one)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, z, padding_mask=None):
        return self.inner(z, padding_mask)


def test_a_third_party_quantizer_is_exported_features_only(tmp_path):
    _, model = _recipe_model()
    model.quantizer = _ThirdPartyQuantizer(model.quantizer)
    result = hf_export.export_recipe_model(model, tmp_path / "hf")
    assert not result.quantizer
    with pytest.raises(FileNotFoundError, match="holds the encoder only"):
        hf_export.load_quantizer(tmp_path / "hf")


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch):
    _, model = _recipe_model()
    reload = hf_export._reload

    def reload_damaged(folder):
        loaded = reload(folder)
        with torch.no_grad():
            bias = loaded.encoder.layers[1].feed_forward.output_dense.bias
            bias.add_(torch.linspace(-0.1, 0.1, bias.numel()))  # not a constant: the layer norm would remove that
        return loaded

    monkeypatch.setattr(hf_export, "_reload", reload_damaged)
    with pytest.raises(RuntimeError, match="hidden states differ from the original's"):
        hf_export.export_recipe_model(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == []  # no staging folder left either


def test_preprocessing_is_the_runs_sample_rate_and_normalisation(tmp_path):
    config, model = _recipe_model()
    config.data.sample_rate, config.data.normalize = 8000, True
    _write_run(tmp_path / "run", config, model)
    hf_export.main([str(tmp_path / "run"), str(tmp_path / "hf")])
    preprocessor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert preprocessor.sampling_rate == 8000 and preprocessor.do_normalize


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("run/checkpoints/step_00000001", "is or lies inside the source"),
        ("run", "holds the source"),
        ("run/exports/hf", "is a run folder"),
        (".", "holds the source"),
        ("other_run/checkpoints/step_00000001", "is a checkpoint folder"),
        ("other_run/hf", "is a run folder"),
        ("runs", "holds a run folder"),
    ],
)
def test_an_export_never_writes_into_a_run_or_checkpoint_folder(tmp_path, capsys, target, message):
    config, model = _recipe_model()
    _write_run(tmp_path / "run", config, model)
    _write_run(tmp_path / "other_run", config, model)
    _write_run(tmp_path / "runs" / "a", config, model)
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        hf_export.main([str(tmp_path / "run" / "checkpoints" / "step_00000001"), str(tmp_path / target)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert message in err and "refusing to export" in err and len(err.strip().splitlines()) == 1
    assert _tree(tmp_path) == before  # nothing written, nothing replaced


def test_re_exporting_into_an_export_folder_replaces_it(tmp_path):
    _, model = _recipe_model()
    hf_export.export_recipe_model(model, tmp_path / "hf")
    model.quantizer = _ThirdPartyQuantizer(model.quantizer)
    result = hf_export.export_recipe_model(model, tmp_path / "hf")
    assert not result.quantizer and not (tmp_path / "hf" / hf_export.QUANTIZER_CONFIG).exists()
    assert {p.name for p in tmp_path.iterdir()} == {"hf"}


def test_a_vision_run_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "vision_run"
    checkpoint = run / CHECKPOINTS / "step_00000001"
    checkpoint.mkdir(parents=True)
    try:  # the vision recipe's own config when its package is installed, else the sections its config.yaml has
        from simplexvq_recipes.vision.config import VisionRecipeConfig

        (run / CONFIG_FILE).write_text(config_to_yaml(VisionRecipeConfig()))
    except ImportError:
        (run / CONFIG_FILE).write_text("model: {}\ndata:\n  image_size: 256\neval:\n  feature_metrics: true\n")
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(checkpoint / WEIGHTS_FILE))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(SystemExit) as exit_info:
        hf_export.main([str(run), str(tmp_path / "hf")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "is a run of the vision recipe" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_missing_run_is_a_clear_command_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hf_export.main([str(tmp_path / "nowhere"), str(tmp_path / "hf")])
    assert exit_info.value.code == 1
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# The fairseq2 family
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fairseq2_hub():
    fairseq2 = pytest.importorskip("fairseq2")
    from fairseq2.error import InvalidOperationError
    from fairseq2.runtime.dependency import get_dependency_resolver

    from simplexvq.fairseq2_extension import get_simplexvq_wav2vec2_model_hub

    try:
        resolver = fairseq2.init_fairseq2(no_progress=True)
    except InvalidOperationError:  # another test module of this process initialised fairseq2 first
        resolver = get_dependency_resolver()
    return resolver, get_simplexvq_wav2vec2_model_hub()


def _fairseq2_model(hub):
    from fairseq2.device import CPU

    config = hub.get_arch_config("tiny")
    torch.manual_seed(0)
    model = hub.create_new_model(config, device=CPU)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return config, model.eval()


def test_fairseq2_family_exports_with_equal_hidden_states_and_codes(tmp_path, fairseq2_hub):
    _, hub = fairseq2_hub
    config, model = _fairseq2_model(hub)
    result = hf_export.export_fairseq2_model(model, config, tmp_path / "hf")
    assert result.quantizer and result.max_difference <= TOLERANCE
    hf_model = _load(tmp_path / "hf")
    assert hf_model.config.num_codevector_groups == config.num_codebooks
    waveforms, lengths = _batch(seed=11)
    expected = hf_export.fairseq2_hidden_states(model, waveforms, lengths)
    _assert_equal_hidden_states(expected, hf_model, waveforms, lengths)

    projection, quantizer = hf_export.load_quantizer(tmp_path / "hf")
    with torch.no_grad():
        features = hf_model(waveforms[:1]).extract_features
        normed, _, _ = model.encoder_frontend.extract_features(waveforms[:1], _layout(waveforms[:1]))
        expected_codes = model.quantizer(normed).indices  # the family's quantizer on every frame, eval mode
        assert torch.equal(quantizer(projection(features)).indices, expected_codes)


def _layout(waveforms):
    from fairseq2.nn import BatchLayout

    return BatchLayout.of(waveforms)


def test_fairseq2_pre_norm_encoders_are_refused_with_a_reason(fairseq2_hub):
    from fairseq2.models.transformer import TransformerNormOrder

    _, hub = fairseq2_hub
    config = hub.get_arch_config("tiny")
    config.encoder_config.norm_order = TransformerNormOrder.PRE
    with pytest.raises(ValueError, match=r"\['norm_order'\].*post-norm"):
        hf_export.fairseq2_shape(config)


def _fairseq2_run(run_dir, resolver, hub):
    """A run folder as fairseq2's trainer writes it (checkpoints/model.yaml, checkpoints/step_2/model/...)."""
    from fairseq2.checkpoint import ModelMetadataDumper, StandardCheckpointManager
    from fairseq2.device import CPU
    from fairseq2.file_system import FileSystem
    from fairseq2.gang import create_fake_gangs
    from fairseq2.io import TensorFileDumper, TensorFileLoader
    from fairseq2.utils.threading import ThreadPool

    from simplexvq.fairseq2_extension import SIMPLEXVQ_WAV2VEC2_FAMILY

    config, model = _fairseq2_model(hub)
    manager = StandardCheckpointManager(
        run_dir,
        create_fake_gangs(CPU),
        resolver.resolve(FileSystem),
        resolver.resolve(TensorFileLoader),
        resolver.resolve(TensorFileDumper),
        resolver.resolve(ThreadPool),
    )
    manager.save_model_only(2, model, blocking=True)
    resolver.resolve(ModelMetadataDumper).dump(run_dir / "checkpoints", SIMPLEXVQ_WAV2VEC2_FAMILY, config)
    return config, model


def _export_in_a_fresh_process(run_dir, out) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "simplexvq_recipes.speech.downstream.hf_export", str(run_dir), str(out)]
    env = {**os.environ, "FAIRSEQ2_EXTENSION_TRACE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_fairseq2_checkpoint_exports_from_the_command_line(tmp_path, fairseq2_hub):
    """A checkpoint as fairseq2's trainer writes it, exported by the command line in a fresh process."""
    resolver, hub = fairseq2_hub
    run_dir, out = tmp_path / "fairseq2_run", tmp_path / "hf"
    config, model = _fairseq2_run(run_dir, resolver, hub)
    result = _export_in_a_fresh_process(run_dir, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exported fairseq2 model" in result.stdout

    waveforms, lengths = _batch(seed=13)
    expected = hf_export.fairseq2_hidden_states(model, waveforms, lengths)
    _assert_equal_hidden_states(expected, _load(out), waveforms, lengths)
    assert hf_export.load_quantizer(out)[1].config == model.quantizer.core.config


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_poisoned_fairseq2_checkpoint_never_runs_whatever_model_yaml_says(tmp_path, fairseq2_hub):
    """``restrict: false`` in model.yaml would make fairseq2's own card loader unpickle freely; the export loads
    with the restricted unpickler regardless and stops with one line naming the file."""
    resolver, hub = fairseq2_hub
    run_dir = tmp_path / "fairseq2_run"
    _fairseq2_run(run_dir, resolver, hub)
    shards = list((run_dir / "checkpoints").rglob("*.pt"))
    assert shards
    marker = tmp_path / "code_ran"
    for shard in shards:
        state = torch.load(shard, weights_only=True)
        state["poison"] = _Payload(marker)
        torch.save(state, shard)
    with (run_dir / "checkpoints" / "model.yaml").open("a") as model_yaml:
        model_yaml.write("restrict: false\n")
    result = _export_in_a_fresh_process(run_dir, tmp_path / "hf")
    assert not marker.exists(), "the checkpoint's payload ran"
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: refusing to load" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "hf").exists()


def test_importing_the_exports_and_the_model_imports_neither_transformers_nor_fairseq2_nor_torchaudio():
    modules = [
        "simplexvq_recipes.speech.downstream.hf_export",
        "simplexvq_recipes.speech.downstream.export",
        "simplexvq_recipes.speech.pretraining.model",
        "simplexvq_recipes.speech.pretraining.config",
    ]
    probe = (
        f"import sys, {', '.join(modules)}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'fairseq2', 'torchaudio'}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_fairseq2_own_wav2vec2_exports_features_only(tmp_path, fairseq2_hub):
    """fairseq2's own ``wav2vec2`` family (Gumbel quantizer): the encoder maps the same way; no quantizer files."""
    from fairseq2.device import CPU
    from fairseq2.models.wav2vec2 import Wav2Vec2Config, get_wav2vec2_model_hub

    from simplexvq.fairseq2_extension.config import tiny_encoder_config

    config = Wav2Vec2Config(encoder_config=tiny_encoder_config(), final_dim=16, quantized_dim=16, num_codebooks=2)
    torch.manual_seed(0)
    model = get_wav2vec2_model_hub().create_new_model(config, device=CPU).eval()
    result = hf_export.export_fairseq2_model(model, config, tmp_path / "hf")
    assert not result.quantizer and not (tmp_path / "hf" / hf_export.QUANTIZER_CONFIG).exists()
    waveforms, lengths = _batch(seed=17)
    expected = hf_export.fairseq2_hidden_states(model, waveforms, lengths)
    _assert_equal_hidden_states(expected, _load(tmp_path / "hf"), waveforms, lengths)


# --------------------------------------------------------------------------------------------------------------
# torchaudio interop (optional: skipped where torchaudio does not load)
# --------------------------------------------------------------------------------------------------------------


def _torchaudio():
    try:
        import torchaudio
    except (ImportError, OSError) as error:  # OSError: a torchaudio build that does not load beside this torch
        pytest.skip(f"torchaudio does not load here: {error}")
    return torchaudio


@pytest.fixture
def recipe_run(tmp_path):
    config, model = _recipe_model()
    _write_run(tmp_path / "run", config, model)
    return tmp_path / "run", model


def test_torchaudio_export_gives_torchaudios_model_with_the_runs_hidden_states(recipe_run, tmp_path, capsys):
    torchaudio = _torchaudio()
    run, model = recipe_run
    out = export.main([str(run), str(tmp_path / "encoder.pt")])
    assert "load_exported" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)  # plain tensors and Python values only
    rebuilt = torchaudio.models.wav2vec2_model(**saved["hyperparameters"])
    rebuilt.load_state_dict(saved["state_dict"])  # strict: every weight has a place, nothing is missing
    loaded = export.load_exported(out)
    assert type(loaded) is torchaudio.models.Wav2Vec2Model and not loaded.training
    waveforms, lengths = _batch(seed=19)
    expected = export.recipe_hidden_states(model, waveforms, lengths)
    actual = export.torchaudio_hidden_states(loaded, waveforms, lengths)
    frames = model.frame_lengths(lengths)
    assert len(actual) == len(expected) == model.config.num_layers and frames[1] < actual[0].shape[1]
    assert export.max_hidden_state_difference(expected, actual, frames) <= TOLERANCE


def test_torchaudio_export_rejects_foreign_and_incomplete_files(recipe_run):
    _torchaudio()
    _, model = recipe_run
    state = export.export_state(model)
    with pytest.raises(ValueError, match="not an exported simplexvq encoder"):
        export.build_exported({"format": "something else"})
    broken = dict(state, state_dict={k: v for k, v in state["state_dict"].items() if "pos_conv" not in k})
    with pytest.raises(RuntimeError, match="pos_conv"):
        export.build_exported(broken)


def test_torchscript_export_matches_the_run_and_leaves_the_model_intact(recipe_run, tmp_path, capsys):
    _torchaudio()
    run, model = recipe_run
    keys = list(model.state_dict())
    with pytest.raises(TypeError, match="expects a Wav2Vec2Pretrainer"):
        export.script_encoder(model.wav2vec2)
    export.main([str(run), str(tmp_path / "encoder.pt"), "--torchscript", str(tmp_path / "encoder.ts")])
    assert "torch.jit.load" in capsys.readouterr().out
    assert list(model.state_dict()) == keys
    scripted = torch.jit.load(str(tmp_path / "encoder.ts"))
    waveforms, lengths = _batch(seed=23)
    expected = export.recipe_hidden_states(model, waveforms, lengths)
    actual = export.torchaudio_hidden_states(scripted, waveforms, lengths)
    assert export.max_hidden_state_difference(expected, actual, model.frame_lengths(lengths)) <= TOLERANCE


def test_without_torchaudio_the_export_says_what_to_install(recipe_run, tmp_path, capsys, monkeypatch):
    run, _ = recipe_run
    monkeypatch.setitem(sys.modules, "torchaudio", None)  # import torchaudio raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(run), str(tmp_path / "encoder.pt")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torchaudio is not installed or does not load beside torch" in err
    major, minor = torch.__version__.split(".")[:2]
    if (int(major), int(minor)) <= export.TORCHAUDIO_LAST_RELEASE:
        assert f"pip install 'torchaudio=={major}.{minor}.*' beside torch {major}.{minor}" in err
    assert not (tmp_path / "encoder.pt").exists()
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    assert "torchaudio's last release is 2.11 and has no build for torch 2.13" in export.torchaudio_install_hint()
    assert "hf_export" in export.torchaudio_install_hint()
    monkeypatch.setattr(torch, "__version__", "2.10.1+cu128")
    assert export.torchaudio_install_hint() == "pip install 'torchaudio==2.10.*' beside torch 2.10"


def test_torchaudio_export_never_writes_into_the_checkpoint(recipe_run, capsys):
    run, _ = recipe_run
    checkpoint = run / CHECKPOINTS / "step_00000001"
    before = _tree(run)
    with pytest.raises(SystemExit):
        export.main([str(checkpoint), str(checkpoint / "encoder.pt")])
    assert "refusing to export" in capsys.readouterr().err
    assert _tree(run) == before


def test_output_folder_rules_for_fairseq2_runs_and_ordinary_folders(tmp_path):
    fairseq2_checkpoints = tmp_path / "f2" / "checkpoints"
    (fairseq2_checkpoints / "step_2" / "model").mkdir(parents=True)
    (fairseq2_checkpoints / "model.yaml").write_text("model_family: wav2vec2\n")
    for target, message in [
        (fairseq2_checkpoints / "hf", "is a checkpoints folder"),
        (fairseq2_checkpoints / "step_2" / "hf", "is a checkpoint folder"),
        (tmp_path / "f2" / "hf", "is a run folder"),
        (tmp_path / "f2" / "..", "holds a"),
    ]:
        with pytest.raises(export.ExportError, match=message):
            export.check_output_folder(target)
    ordinary = tmp_path / "exports" / "checkpoints" / "hf"  # a folder named checkpoints that holds no step_*
    export.check_output_folder(ordinary)
    export.check_output_folder(tmp_path / "exports")
    export.check_output_folder(tmp_path / "file_export_beside_runs", refuse_holding=False)
    export.check_output_folder(tmp_path, refuse_holding=False)  # a .pt file may sit next to a run folder

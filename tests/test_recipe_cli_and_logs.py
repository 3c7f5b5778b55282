"""What a user of the recipes sees: packaged presets by name (``--preset``), ``--help`` listing the values of the
chosen preset, the training loss in ``train.log`` at the logging interval, and no progress bar in redirected logs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simplexvq_recipes.speech.pretraining.config import PretrainConfig
from simplexvq_recipes.speech.pretraining.config import preset_path as speech_preset_path
from simplexvq_recipes.training.config import config_to_dict, flatten, load_config, parse_recipe_args
from simplexvq_recipes.training.runlog import interval_line, show_progress_bar
from simplexvq_recipes.vision import config as vision_config
from simplexvq_recipes.vision.config import VisionRecipeConfig

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import toy_task  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _help(module: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, *args, "--help"], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _setting_lines(config) -> set[str]:
    return {f"  {key} = {'null' if value is None else value}" for key, value in flatten(config_to_dict(config)).items()}


# ---------------------------------------------------------------------------------------------------------------
# presets and --help
# ---------------------------------------------------------------------------------------------------------------


def test_vision_presets_are_the_packaged_yaml_files():
    packaged = {path.stem for path in vision_config.preset_path("photos_demo").parent.glob("*.yaml")}
    assert set(vision_config.PRESETS) == packaged
    with pytest.raises(KeyError, match="known presets: imagenet_16x16x32"):
        vision_config.preset_path("photos")


def test_vision_preset_by_name_equals_its_yaml_file(tmp_path):
    config = parse_recipe_args(
        VisionRecipeConfig, ["--preset", "photos_demo", "training.steps=7"], presets=vision_config.preset_paths()
    )
    assert config == load_config(VisionRecipeConfig, vision_config.preset_path("photos_demo"), ["training.steps=7"])
    assert config.data.dataset == "photos" and config.training.steps == 7


def test_preset_and_config_file_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        parse_recipe_args(
            VisionRecipeConfig, ["--preset", "photos_demo", "--config", "x.yaml"], presets=vision_config.preset_paths()
        )
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "preset", "expected"),
    [
        (
            "simplexvq_recipes.speech.pretraining.train",
            "tiny",
            lambda: load_config(PretrainConfig, speech_preset_path("tiny")),
        ),
        (
            "simplexvq_recipes.vision.train",
            "photos_demo",
            lambda: load_config(VisionRecipeConfig, vision_config.preset_path("photos_demo")),
        ),
    ],
)
def test_help_with_a_preset_lists_the_presets_values(module, preset, expected, tmp_path):
    """Run outside the source tree: the presets are package data, found by name."""
    shown = _help(module, "--preset", preset, cwd=tmp_path)
    defaults = _help(module, cwd=tmp_path)
    preset_lines, default_lines = _setting_lines(expected()), _setting_lines(type(expected())())
    changed = preset_lines - default_lines
    assert changed, "the preset changes no setting"
    assert f"with --preset {preset}" in shown
    for line in preset_lines:
        assert line + "\n" in shown, line
    for line in changed:
        assert line + "\n" not in defaults, line
    # the flag order does not matter
    assert _help(module, cwd=tmp_path).count("\n") == defaults.count("\n")
    flipped = subprocess.run(
        [sys.executable, "-m", module, "--help", "--preset", preset],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    assert flipped.stdout == shown


# ---------------------------------------------------------------------------------------------------------------
# logs
# ---------------------------------------------------------------------------------------------------------------


def test_interval_line_shows_the_loss_first_and_leaves_out_per_group_entries():
    scalars = {"train/usage/0": 0.5, "train/lr": 1e-3, "train/loss": 2.5, "train/perplexity": 3.25, "valid/loss": 9.0}
    line = interval_line(40, 100, scalars)
    assert line == "step 40/100  loss 2.5000  lr 1.000e-03  perplexity 3.25"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_unless_set():
    assert show_progress_bar(None, _Terminal()) is True
    assert show_progress_bar(None, io.StringIO()) is False
    assert show_progress_bar(True, io.StringIO()) is True
    assert show_progress_bar(False, _Terminal()) is False


def test_train_log_holds_the_training_loss_at_the_logging_interval(tmp_path):
    run_dir = tmp_path / "run"
    toy_task.run(
        [f"training.output_dir={run_dir}", "training.tensorboard=false", "training.steps=4", "training.log_every=2"]
    )
    lines = (run_dir / "train.log").read_text().splitlines()
    interval = [line for line in lines if " step " in line and "/4  loss " in line]
    assert [line.split(" step ")[1].split()[0] for line in interval] == ["2/4", "4/4"]
    assert all("lr " in line and "s/step " in line for line in interval)


def test_no_progress_bar_in_redirected_output_by_default(tmp_path):
    """stderr is a pipe here: the default (``training.progress_bar=null``) draws no bar; ``true`` still does."""
    script = f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); import toy_task; toy_task.run(sys.argv[1:])"

    def stderr_of(*overrides: str) -> str:
        command = [sys.executable, "-c", script, f"training.output_dir={tmp_path / overrides[0]}", *overrides[1:]]
        command += ["training.tensorboard=false", "training.steps=3"]
        result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stderr

    assert "3/3 [" not in stderr_of("default")
    assert "3/3 [" in stderr_of("forced", "training.progress_bar=true")

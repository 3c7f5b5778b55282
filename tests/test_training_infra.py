"""Shared recipe pieces: configs with overrides, schedules, atomic files, checkpoints with exact resume, plots."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simplexvq_recipes.training.atomic import atomic_write_json, atomic_write_text
from simplexvq_recipes.training.config import load_config, parse_recipe_args
from simplexvq_recipes.training.plots import plot_code_histogram, plot_code_usage
from simplexvq_recipes.training.schedule import warmup_cosine_factor, warmup_cosine_scheduler
from simplexvq_recipes.training.tracking import MetricHistory, to_scalars

TOY = Path(__file__).parent / "scripts" / "toy_task.py"


@dataclasses.dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.99])


@dataclasses.dataclass
class RecipeConfig:
    quantizer: str = "softmax-knn_ce"
    steps: int = 10
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_config_defaults_yaml_then_overrides(tmp_path):
    assert load_config(RecipeConfig) == RecipeConfig()
    yaml = tmp_path / "c.yaml"
    yaml.write_text("steps: 20\noptim:\n  lr: 0.5\n")
    config = load_config(RecipeConfig, yaml, ["optim.lr=0.25", "quantizer=ste-euclid"])
    assert config == RecipeConfig(quantizer="ste-euclid", steps=20, optim=Optim(lr=0.25))
    assert parse_recipe_args(RecipeConfig, ["--config", str(yaml), "steps=3"]).steps == 3


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="stepz"):
        load_config(RecipeConfig, overrides=["stepz=3"])
    with pytest.raises(ValueError, match="steps"):
        load_config(RecipeConfig, overrides=["steps=many"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(RecipeConfig, overrides=["steps"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(RecipeConfig, tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("steps: [1\n", r"bad.yaml: not valid YAML \(did not find expected ',' or '\]' at line 2, column 1\); fix"),
        (
            "optim:\n  lr: 1\n   betas: 2\n",
            r"bad.yaml: not valid YAML \(mapping values are not allowed .*at line 3, column",
        ),
        ("- steps\n- 3\n", r"bad.yaml: the file is a list; a config file maps keys to values"),
        ("steps: many\n", r"invalid RecipeConfig setting from .*bad.yaml: Value 'many' .* \(key steps\)$"),
    ],
)
def test_a_malformed_config_file_is_one_line_naming_the_file(tmp_path, text, expected):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=expected) as error:
        load_config(RecipeConfig, tmp_path / "bad.yaml")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("steps=[", r"command line: the value of 'steps=\[' is not valid YAML \(did not find expected node content\)"),
        ("optim.betas=[1,2", r"command line: the value of 'optim.betas=\[1,2' is not valid YAML"),
        ("steps={a", r"command line: the value of 'steps=\{a' is not valid YAML"),
        ("=3", r"override '=3' is not of the form key=value"),
        ("optim.lr=fast", r"setting from command line \(optim.lr=fast\): Value 'fast' .* \(key optim.lr\)$"),
    ],
)
def test_a_malformed_override_is_one_line_naming_it(override, expected):
    with pytest.raises(ValueError, match=expected) as error:
        load_config(RecipeConfig, overrides=["steps=3", override])
    assert "\n" not in str(error.value)


def test_warmup_cosine_matches_formula():
    factor = warmup_cosine_factor(warmup_steps=10, total_steps=110, final_ratio=0.01)
    assert factor(0) == 0.0 and factor(5) == pytest.approx(0.5) and factor(10) == pytest.approx(1.0)
    for step in (10, 35, 60, 85, 110):
        progress = (step - 10) / 100
        expected = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
        assert factor(step) == pytest.approx(expected)
    assert factor(500) == pytest.approx(0.01)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = warmup_cosine_scheduler(optimizer, 10, 110, 0.5)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="final_ratio"):
        warmup_cosine_factor(1, 10, 1.5)


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_text(target, '{"a": 2}')
    assert target.read_text() == '{"a": 2}'
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_metric_history_flattens_groups_and_skips_nan():
    scalars = to_scalars({"usage": torch.tensor([0.5, 1.0]), "loss": torch.tensor(2.0), "n": 3}, prefix="val/")
    assert scalars == {"val/usage/0": 0.5, "val/usage/1": 1.0, "val/loss": 2.0, "val/n": 3.0}

    class FakeAccelerator:
        logged: list = []

        def log(self, values, step):
            self.logged.append((step, values))

    history = MetricHistory()
    history.log(FakeAccelerator(), 4, {"usage": torch.tensor([0.5, float("nan")])}, prefix="val/")
    assert history.series("val/usage/0") == ([4.0], [0.5]) and "val/usage/1" not in history.keys()


def test_plots_write_pngs(tmp_path):
    history = MetricHistory([{"step": 1.0, "val/usage/0": 0.2, "val/usage/1": 0.3}, {"step": 2.0, "val/usage/0": 1.0}])
    usage_png = plot_code_usage(history, tmp_path / "usage.png")
    hist_png = plot_code_histogram(torch.tensor([[5.0, 0.0, 1.0], [1.0, 1.0, 1.0]]), tmp_path / "hist.png")
    for png in (usage_png, hist_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    with pytest.raises(ValueError, match="no metric"):
        plot_code_usage(history, tmp_path / "x.png", prefix="train/usage")


def _run_toy(output: Path, *overrides: str) -> int:
    command = [sys.executable, str(TOY), f"training.output_dir={output}", "training.steps=13"]
    command += ["training.checkpoint_every=3", "training.progress_bar=false", "training.tensorboard=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(command, env=env, capture_output=True, timeout=180).returncode


def _final(output: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    checkpoint = output / "checkpoints" / "step_00000013"
    history = json.loads((checkpoint / "trainer_state.json").read_text())["history"]
    return load_file(str(checkpoint / "model.safetensors")), [
        {k: v for k, v in row.items() if "seconds" not in k} for row in history
    ]


@pytest.fixture(scope="module")
def unbroken_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("unbroken")
    assert _run_toy(output) == 0
    return _final(output)


@pytest.mark.parametrize("kill_after", [6, 8])
def test_run_killed_with_sigkill_resumes_to_identical_parameters(tmp_path, kill_after, unbroken_run):
    """The shared loop on a model with dropout and a Gumbel KNN-CE quantizer, killed right after a checkpoint (6) or
    between checkpoints (8): the resumed run matches an unbroken one in parameters and every logged metric."""
    assert _run_toy(tmp_path / "killed", f"toy.kill_after_step={kill_after}") == -9
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003", "step_00000006"]
    (checkpoints / ".tmp-step_00000009").mkdir()  # a save interrupted by the kill must be ignored
    assert _run_toy(tmp_path / "killed") == 0
    weights, history = _final(tmp_path / "killed")
    reference_weights, reference_history = unbroken_run
    assert weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        assert torch.equal(weights[name], value), name
    assert history == reference_history and len([row for row in history if "train/loss" in row]) == 13

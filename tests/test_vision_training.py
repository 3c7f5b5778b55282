"""The vision recipe end to end on real photographs (CPU): learning, full code use with KNN-CE, exact resume after
SIGKILL, a 2-process gloo run, and the evaluate command's JSON + Table 1 row."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from simplexvq_recipes.training.config import load_config
from simplexvq_recipes.training.distributed import check_launch
from simplexvq_recipes.vision import evaluate as evaluate_command
from simplexvq_recipes.vision.config import VisionRecipeConfig
from simplexvq_recipes.vision.photos import PhotoTiles
from simplexvq_recipes.vision.table import paper_label, table1_markdown
from simplexvq_vision import PRESETS

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from bounded_run import run_bounded  # noqa: E402

CONFIG = Path(__file__).parents[1] / "recipes" / "simplexvq_recipes" / "configs" / "vision" / "photos_demo.yaml"
STEPS = 100
# A narrow 64x64xC-style model (reduction 4) on 16x16 photo tiles: 4x4 latent pixels of 8 channels, 32 codes.
SMALL = [
    "--preset=photos_demo",  # packaged with the recipe (CONFIG is the same file in the source tree)
    "model.quantizer.method=softmax-knn_ce",
    "model.stem_channels=32",
    "model.channels=[32,16,8]",
    "model.strides=[2,2,1]",
    "model.quantizer.codebook_size=32",
    "model.quantizer.knn_k=4",
    "data.image_size=16",
    "data.batch_size=16",
    "data.eval_batch_size=256",
    "data.photo_scales=[0.25]",
    "optim.lr=5e-3",
    "optim.warmup_steps=10",
    f"training.steps={STEPS}",
    "training.log_every=10",
    "training.eval_every=50",
    "training.checkpoint_every=25",
    "training.keep_last=10",
]


FAST_EVAL = ["data.eval_batch_size=2", "eval.max_batches=1", "eval.feature_metrics=false"]


def _train_command(output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "simplexvq_recipes.vision.train", *SMALL, f"training.output_dir={output_dir}", *extra]


def _environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _run(command: list[str], **environment: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=_environment(**environment), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _history(run: Path, step: int = STEPS) -> list[dict[str, float]]:
    return json.loads((run / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())["history"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One unbroken single-process run (shared by the learning, resume and evaluation tests)."""
    run = tmp_path_factory.mktemp("vision") / "unbroken"
    _run(_train_command(run))
    return run


@pytest.mark.slow
def test_short_cpu_training_lowers_error_and_uses_every_code_with_knn_ce(trained_run):
    history = _history(trained_run)
    val = [row for row in history if "val/rmse" in row]
    train = [row["train/reconstruction_mse"] for row in history if "train/reconstruction_mse" in row]
    assert [row["step"] for row in val] == [0, 50, STEPS]
    untrained, final = val[0], val[-1]
    assert final["val/rmse"] < 0.9 * untrained["val/rmse"], (untrained["val/rmse"], final["val/rmse"])
    assert final["val/psnr"] > untrained["val/psnr"]
    assert train[-1] < 0.6 * train[0], train
    final_metrics = json.loads((trained_run / "results.json").read_text())
    assert final_metrics["usage"] == 1.0 and final_metrics["dead_codes"] == 0, final_metrics
    assert final_metrics["num_images"] == len(PhotoTiles("val", 16, scales=[0.25]))  # the whole validation set
    for name in ("reconstructions.png", "code_histogram.png", "code_usage.png", "config.yaml"):
        assert (trained_run / name).stat().st_size > 0, name
    assert json.loads((trained_run / "history.json").read_text()) == history
    assert list((trained_run / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_unbroken_runs_parameters(trained_run, tmp_path):
    run = tmp_path / "killed"
    process = subprocess.Popen(
        _train_command(run), env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    first = run / "checkpoints" / "step_00000025"
    deadline = time.monotonic() + 300
    while not first.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not (run / "results.json").exists()
    killed_at = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))[-1]
    assert killed_at < f"step_{STEPS:08d}"

    resumed = _run(_train_command(run))
    assert "resumed from" in resumed.stdout
    assert not [p for p in (run / "checkpoints").rglob("*") if p.suffix in (".pkl", ".bin")]  # nothing to unpickle
    expected = load_file(trained_run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    actual = load_file(run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after SIGKILL + resume"

    def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in row.items() if not k.endswith("seconds_per_step")} for row in history]

    assert without_timing(_history(run)) == without_timing(_history(trained_run))  # same losses and metrics


@pytest.mark.slow
def test_a_resume_with_a_changed_learning_rate_is_refused_and_the_run_still_evaluates(trained_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    saved = (run / "config.yaml").read_text()
    result = subprocess.run(
        _train_command(run, "optim.lr=0.5", "data.image_size=32"),
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=600,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "optim.lr: 0.005 (checkpoint) -> 0.5 (now)" in result.stderr and "data.image_size: 16" in result.stderr
    assert (run / "config.yaml").read_text() == saved
    metrics = evaluate_command.main(["--run-dir", str(run), "--output-dir", str(tmp_path / "eval")] + FAST_EVAL)
    assert metrics["step"] == STEPS


@pytest.mark.slow
def test_two_process_gloo_run_shards_data_and_evaluates_every_image_once(tmp_path):
    run = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "simplexvq_recipes.vision.train",
        *SMALL,
        f"training.output_dir={run}",
        "training.steps=4",
        "training.checkpoint_every=2",
        "training.eval_at_start=false",
    ]
    _run(command)
    checkpoint = run / "checkpoints" / "step_00000004"
    assert (checkpoint / "rng_0.safetensors").is_file() and (checkpoint / "rng_1.safetensors").is_file()
    assert "knn_scope=global" in (run / "train.log").read_text()  # the multi-process default
    final_metrics = json.loads((run / "results.json").read_text())
    assert final_metrics["num_images"] == len(PhotoTiles("val", 16, scales=[0.25]))  # gathered without duplicates


def test_a_multi_process_launch_that_accelerate_did_not_pick_up_is_refused(monkeypatch):
    # every process would otherwise train its own copy into the same folder
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 but Accelerate runs 1"):
        check_launch(SimpleNamespace(num_processes=1))
    check_launch(SimpleNamespace(num_processes=2))


@pytest.mark.slow
def test_evaluate_command_without_inception_weights_reports_a_named_fallback(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no cached Inception weights
    with pytest.warns(RuntimeWarning, match="FID and Inception Score are NOT computed"):
        metrics = evaluate_command.main(
            ["--run-dir", str(trained_run), "--output-dir", str(tmp_path / "eval"), "data.eval_batch_size=2"]
            + ["eval.max_batches=1"]
        )
    assert metrics["fid"] is None and metrics["inception_score"] is None
    assert metrics["fd_random_inception_v3"] > 0 and "not FID" in metrics["feature_network"]
    assert not metrics["whole_validation_set"]
    assert metrics["step"] == STEPS and metrics["num_images"] == 2 and metrics["feature_map"] == "4×4×8"
    saved = json.loads((tmp_path / "eval" / f"step_{STEPS:08d}.json").read_text())
    assert saved["rmse"] == pytest.approx(metrics["rmse"])
    markdown = (tmp_path / "eval" / f"step_{STEPS:08d}.md").read_text()
    assert "FD random-init Inception-v3, not FID" in markdown and "| FID" not in markdown
    assert "| Softmax | KNN-CE |" in markdown and "| n/a |" in markdown


@pytest.mark.slow
def test_evaluate_command_with_a_local_inception_weights_file(trained_run, tmp_path):
    # TEST ONLY: a randomly initialised inception_v3 state_dict stands in for the real ImageNet weights file, to
    # exercise the local-file code path; the "FID" and "IS" it gives are meaningless numbers.
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    weights = tmp_path / "inception_v3_RANDOM_WEIGHTS_for_tests.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    metrics = evaluate_command.main(
        ["--run-dir", str(trained_run), "--output-dir", str(tmp_path / "eval"), "data.eval_batch_size=2"]
        + ["eval.max_batches=1", f"eval.inception_weights={weights}", "eval.is_splits=1"]
    )
    assert metrics["fid"] >= 0 and metrics["inception_score"] >= 1.0 - 1e-9 and metrics["num_images"] == 2
    assert "fd_random_inception_v3" not in metrics
    markdown = (tmp_path / "eval" / f"step_{STEPS:08d}.md").read_text()
    assert "| FID (↓) | IS (↑) |" in markdown and f"| {100 * metrics['usage']:.1f}% |" in markdown
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        evaluate_command.main(["--run-dir", str(trained_run), f"eval.inception_weights={tmp_path}/nowhere.pth"])


@pytest.mark.parametrize("name", list(PRESETS))
def test_imagenet_yaml_presets_are_the_papers_table3_and_need_the_data_root(name):
    path = CONFIG.parent / f"imagenet_{name}.yaml"
    config = load_config(VisionRecipeConfig, path, ["data.root=/data/imagenet"])
    config.validate()
    assert config.model == PRESETS[name]
    assert config.model.quantizer.knn_k == (2 if name == "16x16x32" else 8)  # explicit in the YAML
    assert (config.data.image_size, config.data.batch_size, config.optim.warmup_steps) == (256, 16, 16_000)
    assert config.optim.betas == [0.9, 0.99] and config.optim.final_lr_ratio == 0.5
    assert config.training.epochs == (25 if name == "16x16x32" else 20)
    assert config.optim.resolved("softmax-knn_ce") == (1e-4, 1e-4)
    assert config.optim.resolved("ste-euclid") == config.optim.resolved("rotation-euclid") == (5e-5, 0.0)
    assert config.optim.resolved("ste-cosine") == (1e-4, 1e-4)
    with pytest.raises(ValueError, match="data.root"):
        load_config(VisionRecipeConfig, path).validate()


def test_table1_row_uses_the_papers_method_labels():
    assert paper_label("hard_gumbel-knn_l2") == ("H-Gmb", "KNN-L2")
    assert paper_label("rotation-euclid") == ("RE", "Euclid")
    assert paper_label("simvq") == ("SimVQ", "")
    metrics = {"method": "soft_gumbel-perplexity", "feature_map": "16×16×32", "codebook_size": 1024}
    metrics.update(usage=0.55, rmse=0.8261, fid=173.5934, inception_score=9.6051, feature_network="Inception-v3")
    assert table1_markdown(metrics).splitlines()[-1] == "| S-Gmb | PPL | 55.0% | 0.826 | 173.593 | 9.605 |"


def test_a_short_evaluation_reads_only_the_images_it_evaluates():
    config = load_config(VisionRecipeConfig, CONFIG, ["eval.max_batches=1", "data.eval_batch_size=2"])
    config.data.num_workers = 8
    images = list(range(50))
    subset, data = evaluate_command.limited(images, config, num_processes=2)
    assert list(subset) == [0, 1, 2, 3] and data.num_workers == 1  # 1 batch of 2 on each of 2 processes
    config.eval.max_batches = 0
    assert evaluate_command.limited(images, config, 2) == (images, config.data)


def _tiny_image_folder(root: Path, train_images: int, val_images: int = 2) -> Path:
    """The ImageNet layout with a few 16x16 PNGs: root/train/cls/*.png, root/val/cls/*.png."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train_images), ("val", val_images)):
        folder = root / split / "cls"
        folder.mkdir(parents=True)
        for index in range(count):
            pixels = (torch.rand(16, 16, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.mark.parametrize("processes", [1, 2])
def test_fewer_images_than_one_batch_per_process_stop_before_training(tmp_path, processes):
    """3 training images, batches of 4 (whole batches only): no batch per epoch, so the run looped forever."""
    root = _tiny_image_folder(tmp_path / "images", train_images=3 if processes == 1 else 5)
    run = tmp_path / "run"
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [
        *launcher,
        *([] if processes == 1 else [f"--nproc_per_node={processes}"]),
        "-m",
        "simplexvq_recipes.vision.train",
        *SMALL,
        "data.dataset=imagenet",
        f"data.root={root}",
        "data.batch_size=4",
        "data.num_workers=0",
        "training.steps=2",
        "training.progress_bar=false",
        f"training.output_dir={run}",
    ]
    try:
        result = run_bounded(command, env=_environment(), timeout=150)  # a hang kills torchrun's workers too
    except subprocess.TimeoutExpired:
        pytest.fail(f"{processes} process(es) hang on a training set smaller than one batch per process")
    assert result.returncode != 0
    assert "error: the training set gives no batch per process" in result.stderr
    assert result.stderr.count("error: the training set gives no batch per process") == 1  # from rank 0 only
    assert "simplexvq_recipes/" not in result.stderr  # no traceback from the recipe (torchrun adds its own lines)
    assert not run.exists()  # stopped before anything was written

"""The shared training loop on a toy task: accumulation, resume checks, damaged and poisoned checkpoints, the
command line (key names, --help, one-line errors), the log file, and two processes with uneven data."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simplexvq_recipes.speech.pretraining.config import PretrainConfig
from simplexvq_recipes.training.checkpoint import CheckpointError, checkpoint_problem, latest_complete
from simplexvq_recipes.training.config import load_config
from simplexvq_recipes.training.loop import resolve_mixed_precision
from simplexvq_recipes.training.schedule import warmup_cosine_factor

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import toy_task  # noqa: E402

QUIET = ["training.progress_bar=false", "training.tensorboard=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SCRIPTS), *sys.path])}


def _toy(run_dir: Path, *overrides: str) -> dict:
    return toy_task.run([f"training.output_dir={run_dir}", *QUIET, *overrides])


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def test_gradient_accumulation_gives_the_update_of_the_large_batch(tmp_path):
    """2 accumulated batches of 4 rows = 1 batch of 8 rows (a per-row mean loss, no dropout): same parameters."""
    common = ["toy.quantizer=null", "toy.dropout=0.0", "toy.shuffle=false", "training.steps=3"]
    common.append("training.checkpoint_every=3")
    _toy(tmp_path / "large", *common, "toy.rows=8", "toy.batches=3")
    _toy(tmp_path / "accumulated", *common, "toy.rows=4", "toy.batches=6", "training.grad_accumulation=2")
    large, accumulated = _weights(tmp_path / "large", 3), _weights(tmp_path / "accumulated", 3)
    assert large.keys() == accumulated.keys()
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], rtol=1e-5, atol=1e-6)
    # and the check can fail: without accumulation the 4-row batches take different steps
    _toy(tmp_path / "small", *common, "toy.rows=4", "toy.batches=6")
    assert not torch.allclose(_weights(tmp_path / "small", 3)["linear.weight"], large["linear.weight"], atol=1e-4)


def test_run_folder_log_file_summary_and_train_seconds_across_a_resume(tmp_path):
    run = tmp_path / "run"
    first = _toy(run, "training.steps=4", "training.checkpoint_every=2")
    log = (run / "train.log").read_text()
    assert "parameters" in log and "4 optimizer steps" in log and "finished at step 4" in log
    second = _toy(run, "training.steps=8", "training.checkpoint_every=2")
    assert second["train_seconds"] > first["train_seconds"]
    state = json.loads((run / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["train_seconds"] >= first["train_seconds"]
    # the longer schedule is an allowed change, recorded with the step it was applied at
    # and so is the learning rate it implies at the resume step (the schedule is recomputed for the new total)
    lr_key = "learning rate at step 4 (schedule recomputed for 8 instead of 4 steps)"
    changes = json.loads((run / "config_changes.json").read_text())
    assert [record["step"] for record in changes] == [4]
    assert set(changes[0]["changes"]) == {"training.steps", lr_key}
    assert changes[0]["changes"]["training.steps"] == {"old": 4, "new": 8}
    lr_change = changes[0]["changes"][lr_key]
    base_lr = toy_task.ToySettings().lr
    assert lr_change["old"] == pytest.approx(base_lr * warmup_cosine_factor(2, 4, 0.1)(4))
    assert lr_change["new"] == pytest.approx(base_lr * warmup_cosine_factor(2, 8, 0.1)(4))
    assert lr_change["old"] != pytest.approx(lr_change["new"])
    assert "steps: 8" in (run / "config.yaml").read_text()
    assert "changed on resume: training.steps 4 -> 8" in (run / "train.log").read_text()


def test_an_incompatible_resume_is_refused_before_anything_changes(tmp_path):
    run = tmp_path / "run"
    _toy(run, "training.steps=2", "training.checkpoint_every=2")
    saved = (run / "config.yaml").read_text()
    folders = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(ValueError, match=r"toy\.lr: 0\.01 \(checkpoint\) -> 0\.5 \(now\)") as error:
        _toy(run, "training.steps=4", "toy.lr=0.5", "toy.rows=4")
    assert "toy.rows" in str(error.value) and "training.steps" not in str(error.value).split("A resume may")[0]
    assert (run / "config.yaml").read_text() == saved
    assert sorted(p.name for p in run.rglob("*")) == folders
    with pytest.raises(ValueError, match="training.resume=true"):
        _toy(run, "training.steps=2", "training.resume=false")


def _vision_config() -> type:
    """Imported when needed: the vision stack imports timm, which imports triton, and the Triton tests must choose
    triton's interpreter mode before anything imports it (collection imports every test module first)."""
    from simplexvq_recipes.vision.config import VisionRecipeConfig

    return VisionRecipeConfig


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_newest_checkpoint_falls_back_to_the_last_intact_one(tmp_path):
    run = tmp_path / "run"
    _toy(run, "training.steps=4", "training.checkpoint_every=2", "training.keep_last=3")
    reference = _toy(tmp_path / "reference", "training.steps=6", "training.checkpoint_every=2")
    _truncate(run / "checkpoints" / "step_00000004" / "model.safetensors")
    problem = checkpoint_problem(run / "checkpoints" / "step_00000004")
    assert "step_00000004/model.safetensors is truncated" in problem
    with pytest.warns(RuntimeWarning, match=r"step_00000004/model.safetensors is truncated"):
        assert latest_complete(run / "checkpoints") == run / "checkpoints" / "step_00000002"
    with pytest.warns(RuntimeWarning, match="step_00000004/model.safetensors"):
        _toy(run, "training.steps=6", "training.checkpoint_every=2", "training.keep_last=3")
    assert "resumed from" in (run / "train.log").read_text() and "at step 2" in (run / "train.log").read_text()
    for name, value in _weights(tmp_path / "reference", 6).items():  # the resumed run continued exactly
        assert torch.equal(_weights(run, 6)[name], value), name
    assert reference["step"] == 6


def test_resume_from_an_explicit_checkpoint(tmp_path):
    run = tmp_path / "run"
    _toy(run, "training.steps=4", "training.checkpoint_every=2")
    _toy(run, "training.steps=4", f"training.resume_from={run / 'checkpoints' / 'step_00000002'}")
    assert "resumed from" in (run / "train.log").read_text().split("finished at step 4")[1]
    assert "at step 2" in (run / "train.log").read_text().split("finished at step 4")[1]
    _truncate(run / "checkpoints" / "step_00000002" / "optimizer.pt")
    with pytest.raises(CheckpointError, match="step_00000002/optimizer.pt is truncated"):
        _toy(run, "training.steps=4", f"training.resume_from={run / 'checkpoints' / 'step_00000002'}")


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a planted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_runs_code_planted_in_the_checkpoint_folder(tmp_path):
    run = tmp_path / "run"
    _toy(run, "training.steps=2", "training.checkpoint_every=2")
    checkpoint = run / "checkpoints" / "step_00000002"
    assert not [p.name for p in checkpoint.iterdir() if p.suffix in (".pkl", ".bin")]
    marker = tmp_path / "code_ran"
    # Accelerate's file names are ignored: nothing reads them
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "scheduler.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(_Payload(marker)))
    _toy(run, "training.steps=3", "training.checkpoint_every=3")
    assert not marker.exists()
    # a poisoned optimizer state (with a matching manifest) is refused, naming the file
    checkpoint = run / "checkpoints" / "step_00000003"
    torch.save({"state": _Payload(marker), "param_groups": []}, checkpoint / "optimizer.pt")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["optimizer.pt"] = (checkpoint / "optimizer.pt").stat().st_size
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    saved = (run / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"refusing to load .*step_00000003/optimizer.pt"):
        _toy(run, "training.steps=4")
    assert not marker.exists()
    assert (run / "config.yaml").read_text() == saved  # a failed resume leaves the saved config as it was


@pytest.mark.parametrize(
    ("recipe", "old", "new"),
    [
        ("speech", "training.max_steps=5", "training.steps"),
        ("speech", "training.valid_every=5", "training.eval_every"),
        ("speech", "optim.clip_grad_norm=1.0", "training.grad_clip_norm"),
        ("speech", "model.quantizer.name=ste-euclid", "model.quantizer.method"),
        ("speech", "model.quantizer.codebook_dim=8", "model.codebook_dim"),
        ("vision", "output_dir=runs/x", "training.output_dir"),
        ("vision", "optim.grad_clip_norm=1.0", "training.grad_clip_norm"),
        ("vision", "model.method=ste-euclid", "model.quantizer.method"),
        ("vision", "model.knn_k=3", "model.quantizer.knn_k"),
        ("vision", "model.quantizer_options.regularizer_weight=2", "model.quantizer.regularizer_weight"),
    ],
)
def test_old_key_names_are_refused_with_the_new_name(recipe, old, new, tmp_path):
    config_class = PretrainConfig if recipe == "speech" else _vision_config()
    with pytest.raises(ValueError, match="was renamed; use " + re.escape(new)):
        load_config(config_class, overrides=[old])
    key, value = old.split("=")
    *parents, leaf = key.split(".")
    lines = [f"{'  ' * depth}{part}:" for depth, part in enumerate(parents)] + [f"{'  ' * len(parents)}{leaf}: {value}"]
    yaml = tmp_path / "old.yaml"
    yaml.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"old.yaml: {key} was renamed; use {new}")):
        load_config(config_class, yaml)


@pytest.mark.parametrize("module", ["simplexvq_recipes.speech.pretraining.train", "simplexvq_recipes.vision.train"])
def test_help_lists_the_config_keys(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0
    for key in ("training.steps = ", "training.grad_accumulation = 1", "training.resume_from = null"):
        assert key in result.stdout, key
    assert "model.quantizer.knn_scope = null" in result.stdout
    assert "model.quantizer.memory_efficient = null" in result.stdout


def test_a_recipe_error_is_one_short_message_from_rank_0(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "simplexvq_recipes.speech.pretraining.train",
        "--preset",
        "tiny",
        f"data.manifest_dir={tmp_path}",
        "training.max_steps=3",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("error: command line: training.max_steps was renamed; use training.steps") == 1
    assert "simplexvq_recipes/" not in result.stderr  # no traceback from the recipe's processes (torchrun adds its own)


COMPILE_WITHOUT_CODEGEN = """
import sys
import torch
import toy_task

compiled = []
real_compile = torch.compile


def compile_without_codegen(module, **kwargs):
    compiled.append(module)
    return real_compile(module, backend="aot_eager", **kwargs)


torch.compile = compile_without_codegen
toy_task.run(sys.argv[1:])
assert len(compiled) == (1 if "training.compile=true" in sys.argv else 0), compiled
"""


def test_torch_compile_gives_the_eager_result(tmp_path):
    """``training.compile=true`` trains through ``torch.compile`` (AOTAutograd, without inductor's C++ build to keep
    the test fast) and checkpoints the plain module's weights. In a subprocess: importing the compiler imports
    triton, which must not happen in the test process before the Triton tests choose its interpreter mode."""
    common = ["toy.quantizer=null", "toy.dropout=0.0", "training.steps=2", "training.checkpoint_every=2", *QUIET]
    for name, extra in (("eager", []), ("compiled", ["training.compile=true"])):
        command = [sys.executable, "-c", COMPILE_WITHOUT_CODEGEN, f"training.output_dir={tmp_path / name}"]
        result = subprocess.run([*command, *common, *extra], capture_output=True, text=True, env=ENV, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    eager, compiled = _weights(tmp_path / "eager", 2), _weights(tmp_path / "compiled", 2)
    assert compiled.keys() == eager.keys()  # no wrapper prefix in the checkpoint
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-5, atol=1e-6)


def _torchrun(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPTS / "toy_task.py"),
        f"training.output_dir={run_dir}",
        *QUIET,
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)


def test_two_processes_with_uneven_training_and_validation_data(tmp_path):
    """Rank 1 trains on batches of 1 row (fewer than K = 2) and has no validation batch at all: neighbours are
    searched across ranks by default, and validation still meets in every collective."""
    uneven = [
        "toy.quantizer.method=softmax-knn_ce",
        "toy.rank1_rows=1",
        "toy.rank1_valid_batches=0",
        "training.steps=4",
        "training.eval_every=2",
        "training.checkpoint_every=2",
    ]
    result = _torchrun(tmp_path / "default", *uneven)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "default" / "results.json").read_text())
    assert results["step"] == 4 and results["batches"] == 2.0  # rank 0's 2 validation batches, rank 1's none
    assert {"rng_0.safetensors", "rng_1.safetensors"} <= {
        p.name for p in (tmp_path / "default" / "checkpoints" / "step_00000004").iterdir()
    }
    # with the per-process search asked for explicitly, rank 1's short batch is an error (that names K)
    result = _torchrun(tmp_path / "local", *uneven, "toy.quantizer.knn_scope=local")
    assert result.returncode != 0 and "K must not exceed N" in result.stderr


def test_checkpoint_folders_can_be_copied_and_resumed_from_elsewhere(tmp_path):
    run = tmp_path / "run"
    _toy(run, "training.steps=2", "training.checkpoint_every=2")
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    assert _toy(moved, "training.steps=3")["step"] == 3


def test_mixed_precision_auto_is_bf16_on_gpus_that_support_it(monkeypatch):
    assert resolve_mixed_precision("auto", "cpu") == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_mixed_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_mixed_precision("auto", "cuda") == "fp16"
    assert resolve_mixed_precision("no", "cuda") == "no"
    with pytest.raises(ValueError, match="training.mixed_precision must be one of auto, no, bf16, fp16"):
        load_config(
            toy_task.ToyConfig, overrides=["training.steps=1", "training.mixed_precision=fp8"]
        ).training.validate()

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
from simplexvq_recipes.training.checkpoint import CheckpointError, checkpoint_problem, latest_complete, step_folders
from simplexvq_recipes.training.config import load_config
from simplexvq_recipes.training.loop import resolve_mixed_precision, run_training
from simplexvq_recipes.training.runlock import RunFolderLock
from simplexvq_recipes.training.schedule import warmup_cosine_factor

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import toy_task  # noqa: E402
from bounded_run import run_bounded  # noqa: E402

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


def _torchrun(run_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
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
    return run_bounded(command, env=ENV, timeout=timeout)  # a hang kills torchrun's workers too


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


def _forget_embedded_config(checkpoint: Path) -> None:
    """Make ``checkpoint`` look like one written before checkpoints carried their config.yaml."""
    (checkpoint / "config.yaml").unlink()
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest["config.yaml"]
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_resume_from_into_a_new_folder_is_checked_against_the_checkpoints_config(tmp_path):
    source = tmp_path / "source"
    _toy(source, "training.steps=4", "training.checkpoint_every=2")
    checkpoint = source / "checkpoints" / "step_00000002"
    assert "lr: 0.01" in (checkpoint / "config.yaml").read_text()  # every checkpoint carries its config
    fresh = tmp_path / "fresh"
    resume_from = f"training.resume_from={checkpoint}"
    with pytest.raises(ValueError, match=r"toy\.lr: 0\.01 \(checkpoint\) -> 0\.05 \(now\)") as error:
        _toy(fresh, "training.steps=4", "toy.lr=0.05", "toy.quantizer.knn_k=3", resume_from)
    assert "toy.quantizer.knn_k: 2 (checkpoint) -> 3 (now)" in str(error.value)
    assert not fresh.exists()  # refused before anything was written
    # the allowed changes apply and are recorded in the new folder, with the step they were applied at
    assert _toy(fresh, "training.steps=6", resume_from)["step"] == 6
    changes = json.loads((fresh / "config_changes.json").read_text())
    assert [record["step"] for record in changes] == [2]
    assert changes[0]["changes"]["training.steps"] == {"old": 4, "new": 6}
    assert changes[0]["changes"]["training.output_dir"] == {"old": str(source), "new": str(fresh)}
    assert sorted(p.name for p in (source / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_a_run_folder_without_its_config_yaml_is_still_checked(tmp_path):
    run = tmp_path / "run"
    _toy(run, "training.steps=2", "training.checkpoint_every=2")
    (run / "config.yaml").unlink()
    with pytest.raises(ValueError, match=r"toy\.lr: 0\.01 \(checkpoint\) -> 0\.5 \(now\)"):
        _toy(run, "training.steps=4", "toy.lr=0.5")
    assert not (run / "config.yaml").exists()


def test_old_checkpoints_without_their_config_fall_back_to_the_run_folders_or_are_refused(tmp_path):
    run = tmp_path / "run"
    _toy(run, "training.steps=2", "training.checkpoint_every=2")
    checkpoint = run / "checkpoints" / "step_00000002"
    _forget_embedded_config(checkpoint)
    assert checkpoint_problem(checkpoint) is None
    with pytest.raises(ValueError, match=r"run/config.yaml\):\n  toy\.lr: 0\.01 \(checkpoint\)"):
        _toy(run, "training.steps=4", "toy.lr=0.5")
    (run / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="holds no config.yaml .* put the run's config.yaml back into"):
        _toy(run, "training.steps=4")
    assert not (run / "config.yaml").exists()


def test_resume_from_an_older_step_moves_the_abandoned_later_run_aside(tmp_path):
    """The issue's reproduction on the toy task: steps=10 keep_last=3, then steps=9 keep_last=1 from step 6."""
    run = tmp_path / "run"
    _toy(run, "training.steps=10", "training.checkpoint_every=2", "training.keep_last=3")
    step_6 = run / "checkpoints" / "step_00000006"
    results = _toy(
        run, "training.steps=9", "training.checkpoint_every=2", "training.keep_last=1", f"training.resume_from={step_6}"
    )
    assert results["step"] == 9 and json.loads((run / "results.json").read_text())["step"] == 9
    assert [p.name for p in step_folders(run / "checkpoints")] == ["step_00000009"]
    assert latest_complete(run / "checkpoints").name == "step_00000009"  # what a resume or an export picks
    (abandoned,) = (run / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in abandoned.iterdir()) == [
        "history.json",
        "results.json",
        "step_00000008",
        "step_00000010",
    ]
    assert json.loads((abandoned / "results.json").read_text())["step"] == 10
    assert "moved what the abandoned later run left" in (run / "train.log").read_text()


def test_the_checkpoint_resumed_from_stays_until_a_newer_one_is_written(tmp_path):
    """Killed right after resuming from step 6 (of a run that reached step 10): step 6 is still there and is what the
    next plain resume continues from; the abandoned steps 8 and 10 are out of the way."""
    run = tmp_path / "run"
    _toy(run, "training.steps=10", "training.checkpoint_every=2", "training.keep_last=3")
    step_6 = run / "checkpoints" / "step_00000006"
    command = [sys.executable, str(SCRIPTS / "toy_task.py"), f"training.output_dir={run}", *QUIET]
    killed = subprocess.run(
        [
            *command,
            "training.steps=9",
            "training.checkpoint_every=2",
            "training.keep_last=1",
            f"training.resume_from={step_6}",
            "toy.kill_after_step=7",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in step_folders(run / "checkpoints")] == ["step_00000006"]
    assert not (run / "results.json").exists()  # the abandoned run's results moved aside with its checkpoints
    resumed = _toy(run, "training.steps=9", "training.checkpoint_every=2", "training.keep_last=1")
    assert resumed["step"] == 9
    resumes = [line for line in (run / "train.log").read_text().splitlines() if "resumed from" in line]
    assert resumes[-1].endswith("step_00000006 at step 6")


def test_an_epoch_that_cannot_fill_one_optimizer_step_stops_before_training(tmp_path):
    """grad_accumulation=7 with 3 batches per epoch never reached a step: the run looped over epochs forever."""
    command = [sys.executable, str(SCRIPTS / "toy_task.py"), f"training.output_dir={tmp_path / 'run'}", *QUIET]
    try:
        result = run_bounded(
            [*command, "toy.batches=3", "training.grad_accumulation=7", "training.steps=2"],
            env=ENV,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the run hangs when one epoch cannot fill an optimizer step")
    assert result.returncode != 0
    assert "one epoch gives 3 batch(es) per process, fewer than the training.grad_accumulation=7" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written
    with pytest.raises(ValueError, match="the training set gives no batch per process"):
        _toy(tmp_path / "empty", "toy.batches=0", "training.steps=2")


def test_an_epoch_that_cannot_fill_one_optimizer_step_stops_two_processes(tmp_path):
    try:
        result = _torchrun(
            tmp_path / "run", "toy.batches=3", "training.grad_accumulation=7", "training.steps=2", timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("two processes hang when one epoch cannot fill an optimizer step")
    assert result.returncode != 0
    assert "one epoch gives 3 batch(es) per process, fewer than the training.grad_accumulation=7" in result.stderr
    assert not (tmp_path / "run").exists()


class _EmptyBatches(toy_task.ToyTask):
    """A task whose every batch held only unreadable files (skipped)."""

    skip_empty_batches = True

    def batch_is_empty(self, batch) -> bool:
        return True


def test_an_epoch_whose_batches_are_all_skipped_stops_instead_of_looping(tmp_path):
    config = load_config(
        toy_task.ToyConfig,
        overrides=[
            f"training.output_dir={tmp_path / 'run'}",
            *QUIET,
            "training.steps=2",
            "training.eval_at_start=false",
        ],
    )
    with (
        pytest.warns(UserWarning, match="batch skipped"),
        pytest.raises(ValueError, match="epoch 0 ended without an optimizer step: 5 of its 5"),
    ):
        run_training(_EmptyBatches(config), config, config.training)


def test_a_second_run_in_a_busy_run_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    _toy(run, "training.steps=2", "training.checkpoint_every=2")
    holder = RunFolderLock(run)
    holder.acquire()  # what a run training in this folder holds
    try:
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
        with pytest.raises(
            ValueError, match=r"another run is training in .*run \(process \d+ on .*\); wait until it ends"
        ):
            _toy(run, "training.steps=4")
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    finally:
        holder.release()
    assert _toy(run, "training.steps=4")["step"] == 4  # the lock goes with the run that held it

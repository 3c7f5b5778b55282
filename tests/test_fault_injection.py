"""Fault injection: every command-line entry point against the folder shapes users produce.

Entry points: speech training (fresh and resumed), ``hf_export``, ``extract_features``, the vision recipe's training
and ``evaluate``. Folder shapes: another recipe's run, a partial copy, deleted files, a folder that cannot be
written, two runs in one folder at once, files planted to run code (pickles, YAML with Python tags), malformed YAML.
Each case asserts that the command either succeeds or stops with exit status != 0 and one ``error:`` line (no
traceback); that no file outside the command's output folder changed (sizes, modification times and SHA-1 of
every file under the test's folders); and that no planted payload ran (it would create a marker file).

Commands run in this process through :func:`runpy.run_module` with ``run_name="__main__"`` (the module's own
command-line block, as ``python -m`` runs it), so the suite stays within CI's budget; the cases that could hang or
need a second process use subprocesses with timeouts. Everything trains the ``tiny`` speech preset on a 12-file
corpus and a narrow image model for a few steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import pickle
import runpy
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from bounded_run import run_bounded  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end runs of the recipes

CORPUS_SCRIPT = Path(__file__).parent / "scripts" / "speech_corpus.py"
VISION_PRESET = Path(__file__).parents[1] / "recipes" / "simplexvq_recipes" / "configs" / "vision" / "photos_demo.yaml"
SPEECH_TRAIN = "simplexvq_recipes.speech.pretraining.train"
HF_EXPORT = "simplexvq_recipes.speech.downstream.hf_export"
EXTRACT = "simplexvq_recipes.speech.downstream.extract_features"
VISION_TRAIN = "simplexvq_recipes.vision.train"
VISION_EVALUATE = "simplexvq_recipes.vision.evaluate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

SPEECH = [
    "--preset",
    "tiny",
    "data.crop_samples=16000",
    "data.valid_crop_samples=16000",
    "data.min_samples=4000",
    "data.batch_size=4",
    "model.num_negatives=10",
    "training.eval_every=0",
    "training.eval_at_start=false",
    "training.checkpoint_every=2",
    "training.progress_bar=false",
    "training.tensorboard=false",
    "training.threads=1",
]
VISION = [
    f"--config={VISION_PRESET}",
    "model.stem_channels=16",
    "model.channels=[16,16,8]",
    "model.strides=[2,2,1]",
    "model.quantizer.codebook_size=16",
    "model.quantizer.knn_k=4",
    "data.image_size=16",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "data.photo_scales=[0.25]",
    "training.steps=2",
    "training.checkpoint_every=2",
    "training.eval_at_start=false",
    "training.progress_bar=false",
    "training.tensorboard=false",
    "training.grid_images=2",
]
FAST_EVAL = ["data.eval_batch_size=2", "eval.max_batches=1", "eval.feature_metrics=false"]


# ------------------------------------------------------------------------------------------------ the harness


@dataclass
class Outcome:
    code: int | None
    """Exit status; ``None`` when an exception escaped (a traceback)."""
    stdout: str
    stderr: str


def cli(module: str, *args: str | Path) -> Outcome:
    """``python -m module args`` run in this process: the module's ``__main__`` block, stdout and stderr captured."""
    argv, sys.argv = sys.argv, [module, *map(str, args)]
    stdout, stderr = io.StringIO(), io.StringIO()
    code: int | None = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*found in sys.modules.*", category=RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:  # noqa: BLE001 (what the command line would print as a traceback)
        code = None
        stderr.write(traceback.format_exc())
    finally:
        sys.argv = argv
    return Outcome(code, stdout.getvalue(), stderr.getvalue())


def assert_one_line_error(outcome: Outcome, *fragments: str) -> str:
    """Exit status != 0, no traceback, one ``error:`` line holding every fragment; returns that line."""
    assert outcome.code is not None, f"a traceback instead of a one-line error:\n{outcome.stderr[-3000:]}"
    assert outcome.code != 0, f"succeeded, but an error was expected:\n{outcome.stdout[-2000:]}"
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    lines = [line for line in outcome.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, outcome.stderr[-3000:]
    message = outcome.stderr[outcome.stderr.index("error: ") :]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return lines[0]


def assert_success(outcome: Outcome) -> None:
    assert outcome.code == 0, outcome.stderr[-3000:]


def _fingerprint(path: Path) -> tuple[int, int, str]:
    return path.stat().st_size, path.stat().st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest()


def snapshot(roots: list[Path], outputs: list[Path]) -> dict[Path, tuple[int, int, str]]:
    """Every file under ``roots`` except under ``outputs``: size, modification time and SHA-1."""
    found = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not any(path.is_relative_to(output) for output in outputs):
                found[path] = _fingerprint(path)
    return found


@contextlib.contextmanager
def untouched(roots: list[Path], outputs: list[Path] = ()):
    """Assert that nothing under ``roots`` outside ``outputs`` is created, changed or removed."""
    outputs = list(outputs)
    before = snapshot(roots, outputs)
    yield
    after = snapshot(roots, outputs)
    assert sorted(map(str, set(after) - set(before))) == [], "files created outside the output folder"
    assert sorted(map(str, set(before) - set(after))) == [], "files removed outside the output folder"
    changed = sorted(str(path) for path in before if before[path] != after[path])
    assert changed == [], "files changed outside the output folder"


class Payload:
    """Unpickling this creates ``marker``: what a planted file would do if a loader executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickles(folder: Path, marker: Path) -> None:
    """Pickles with a payload under the names other trainers' checkpoints use (no loader of ours reads them)."""
    for name in ("pytorch_model.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl", "scheduler.bin", "model.pt"):
        (folder / name).write_bytes(pickle.dumps(Payload(marker)))


def python_tag_yaml(marker: Path) -> str:
    """YAML whose Python tag would run ``touch marker`` under an unsafe loader."""
    return f'model: !!python/object/apply:os.system ["touch {marker}"]\n'


def set_in_manifest(checkpoint: Path, *names: str) -> None:
    """Record the current sizes of ``names`` in the checkpoint's manifest (what a deliberate tamperer does)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in names:
        if (checkpoint / name).is_file():
            manifest[name] = (checkpoint / name).stat().st_size
        else:
            manifest.pop(name, None)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def steps_of(run: Path) -> list[str]:
    return sorted(path.name for path in (run / "checkpoints").glob("step_*"))


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder holding the corpus and the reference runs (shared, never changed by a case)."""
    return tmp_path_factory.mktemp("world")


@pytest.fixture(scope="module")
def corpus(world) -> Path:
    spec = importlib.util.spec_from_file_location("speech_corpus", CORPUS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_corpus(world / "corpus", num_train=12, num_valid=4)


def speech_args(corpus: Path, run: Path, *overrides: str) -> list[str]:
    return [*SPEECH, f"data.manifest_dir={corpus}", f"training.output_dir={run}", *overrides]


@pytest.fixture(scope="module")
def speech_run(world, corpus) -> Path:
    """4 steps, checkpoints at steps 2 and 4."""
    run = world / "speech_run"
    assert_success(cli(SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=4")))
    assert steps_of(run) == ["step_00000002", "step_00000004"]
    return run


@pytest.fixture(scope="module")
def vision_run(world) -> Path:
    run = world / "vision_run"
    assert_success(cli(VISION_TRAIN, *VISION, f"training.output_dir={run}"))
    assert steps_of(run) == ["step_00000002"]
    return run


@pytest.fixture
def marker(tmp_path) -> Path:
    marker = tmp_path / "code_ran"
    yield marker
    assert not marker.exists(), "a planted payload ran"


# ------------------------------------------------------------------------------------------------ speech training


def test_speech_resume_of_another_recipes_run_folder_is_one_line(world, tmp_path, corpus, vision_run):
    run = copy_run(vision_run, tmp_path / "run")
    with untouched([world, tmp_path]):
        outcome = cli(SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=4"))
    assert_one_line_error(outcome, "written by another recipe (config VisionRecipeConfig)", "PretrainConfig")


def test_speech_resume_from_a_vision_checkpoint_and_back_is_one_line(world, tmp_path, corpus, speech_run, vision_run):
    out = tmp_path / "out"
    with untouched([world, tmp_path]):
        speech = cli(SPEECH_TRAIN, *speech_args(corpus, out, f"training.resume_from={steps_of_path(vision_run)}"))
        vision = cli(
            VISION_TRAIN, *VISION, f"training.output_dir={out}", f"training.resume_from={steps_of_path(speech_run)}"
        )
    assert_one_line_error(speech, "written by another recipe (config VisionRecipeConfig)")
    assert_one_line_error(vision, "written by another recipe (config PretrainConfig)")
    assert not out.exists()


def steps_of_path(run: Path) -> Path:
    """The newest checkpoint folder of ``run``."""
    return run / "checkpoints" / steps_of(run)[-1]


def test_speech_resume_from_a_foreign_read_only_run_into_a_new_folder(world, tmp_path, corpus, speech_run, marker):
    source = copy_run(speech_run, tmp_path / "foreign")
    plant_pickles(source / "checkpoints" / "step_00000002", marker)
    out = tmp_path / "out"
    with untouched([world, tmp_path], [out]):
        for path in [source, *source.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            outcome = cli(
                SPEECH_TRAIN,
                *speech_args(
                    corpus, out, "training.steps=4", f"training.resume_from={source}/checkpoints/step_00000002"
                ),
            )
        finally:
            for path in [source, *source.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
    assert_success(outcome)
    assert json.loads((out / "results.json").read_text())["step"] == 4
    changes = json.loads((out / "config_changes.json").read_text())
    assert changes[0]["step"] == 2 and set(changes[0]["changes"]) == {"training.output_dir", "training.resume_from"}


def test_speech_partial_copy_without_checkpoints_starts_afresh(world, tmp_path, corpus, speech_run):
    run = tmp_path / "run"
    shutil.copytree(speech_run, run, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    with untouched([world, tmp_path], [run]):
        outcome = cli(SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=2"))
    assert_success(outcome)
    assert "resumed from" not in outcome.stdout and steps_of(run) == ["step_00000002"]


def test_speech_resume_after_the_newest_weights_were_deleted_falls_back_and_sets_them_aside(
    world, tmp_path, corpus, speech_run
):
    run = copy_run(speech_run, tmp_path / "run")
    (run / "checkpoints" / "step_00000004" / "model.safetensors").unlink()
    with untouched([world, tmp_path], [run]), pytest.warns(RuntimeWarning, match="step_00000004/model.safetensors"):
        outcome = cli(SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=4"))
    assert_success(outcome)
    assert "at step 2" in outcome.stdout and steps_of(run) == ["step_00000002", "step_00000004"]
    (abandoned,) = (run / "checkpoints").glob("abandoned-*")
    assert (abandoned / "step_00000004").is_dir() and not (abandoned / "step_00000004" / "model.safetensors").exists()


def test_speech_resume_with_every_checkpoint_damaged_is_one_line(world, tmp_path, corpus, speech_run):
    run = copy_run(speech_run, tmp_path / "run")
    for checkpoint in (run / "checkpoints").glob("step_*"):
        (checkpoint / "model.safetensors").unlink()
    with untouched([world, tmp_path]), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        outcome = cli(SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=6"))
    assert_one_line_error(outcome, "no intact checkpoint under", "step_00000004/model.safetensors is missing")


def test_speech_run_folder_that_lost_its_config_resumes_checked_against_the_checkpoint(
    world, tmp_path, corpus, speech_run
):
    run = copy_run(speech_run, tmp_path / "run")
    (run / "config.yaml").unlink()
    with untouched([world, tmp_path]):
        refused = cli(SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=6", "optim.lr=0.05"))
    assert_one_line_error(refused, "optim.lr: 0.001 (checkpoint) -> 0.05 (now)")
    with untouched([world, tmp_path], [run]):
        resumed = cli(SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=6"))
    assert_success(resumed)
    assert "at step 4" in resumed.stdout and (run / "config.yaml").is_file()


def test_speech_resume_from_with_changed_settings_is_refused_listing_them(world, tmp_path, corpus, speech_run):
    """The issue's case: optim.lr=0.05 model.quantizer.knn_k=3 from another run's checkpoint into a new folder."""
    out = tmp_path / "out"
    checkpoint = speech_run / "checkpoints" / "step_00000002"
    with untouched([world, tmp_path]):
        outcome = cli(
            SPEECH_TRAIN,
            *speech_args(corpus, out, "optim.lr=0.05", "model.quantizer.knn_k=3", f"training.resume_from={checkpoint}"),
        )
    assert_one_line_error(outcome, "optim.lr: 0.001 (checkpoint) -> 0.05 (now)", "model.quantizer.knn_k: 4")
    assert not out.exists()


def test_speech_poisoned_checkpoint_files_never_run(world, tmp_path, corpus, speech_run, marker):
    run = copy_run(speech_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step_00000004"
    plant_pickles(checkpoint, marker)
    torch.save({"state": Payload(marker), "param_groups": []}, checkpoint / "optimizer.pt")
    set_in_manifest(checkpoint, "optimizer.pt")
    with untouched([world, tmp_path]):
        optimizer = cli(SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=6"))
    assert_one_line_error(optimizer, "refusing to load", "step_00000004/optimizer.pt")
    (checkpoint / "config.yaml").write_text(python_tag_yaml(marker))
    set_in_manifest(checkpoint, "config.yaml")
    with untouched([world, tmp_path]):
        config = cli(SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=6"))
    assert_one_line_error(config, "step_00000004/config.yaml: not valid YAML")


def test_speech_old_checkpoint_without_any_config_is_one_line(world, tmp_path, corpus, speech_run):
    run = copy_run(speech_run, tmp_path / "run")
    (run / "config.yaml").unlink()
    for checkpoint in (run / "checkpoints").glob("step_*"):
        (checkpoint / "config.yaml").unlink()
        set_in_manifest(checkpoint, "config.yaml")
    with untouched([world, tmp_path]):
        outcome = cli(SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=6"))
    assert_one_line_error(outcome, "holds no config.yaml", "put the run's config.yaml back into")


def test_speech_output_folder_that_cannot_be_created_is_one_line(world, tmp_path, corpus):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    with untouched([world, tmp_path]):
        outcome = cli(SPEECH_TRAIN, *speech_args(corpus, blocker / "run", "training.steps=2"))
    assert_one_line_error(outcome, "cannot write the run folder", "training.output_dir")


def _read_only_mounts_work() -> bool:
    """Whether this (root) process may bind-mount a folder read-only in a private mount namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = "mount --bind /tmp /tmp && mount -o remount,ro,bind /tmp && ! touch /tmp/.simplexvq_probe 2>/dev/null"
    return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0


def test_speech_read_only_run_folder_is_one_line(world, tmp_path, corpus, speech_run):
    """A run folder that cannot be written: read-only by permissions, or (for root, who ignores them) a read-only bind
    mount in a private mount namespace."""
    run = copy_run(speech_run, tmp_path / "run")
    command = [sys.executable, "-m", SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=6")]
    if os.geteuid() == 0:
        if not _read_only_mounts_work():
            pytest.skip("root ignores permissions and cannot mount a read-only folder here")
        mount = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", mount, str(run), *command]
    else:
        for path in [run, *run.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        with untouched([world, tmp_path]):
            result = run_bounded(command, env=ENV, timeout=150)
    finally:
        for path in [run, *run.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert_one_line_error(Outcome(result.returncode, result.stdout, result.stderr), "cannot write the run folder")


def test_speech_second_run_in_a_busy_folder_is_refused(world, tmp_path, corpus, speech_run):
    """A real first run (another process) holds the folder; the second is refused before it writes anything."""
    run = copy_run(speech_run, tmp_path / "run")
    command = [sys.executable, "-m", SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=100000")]
    first = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while f"process {first.pid}" not in _read(run / ".lock"):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never locked its folder"
            time.sleep(0.2)
        with untouched([world, tmp_path], [run]):  # the first run writes into its folder meanwhile
            second = cli(SPEECH_TRAIN, *speech_args(corpus, run, "training.steps=100000"))
    finally:
        first.kill()
        first.wait()
    assert_one_line_error(second, "another run is training in", f"process {first.pid} on")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_speech_every_training_file_unreadable_stops_instead_of_looping(world, tmp_path, corpus):
    broken = tmp_path / "corpus"
    shutil.copytree(corpus, broken)
    for audio in (broken / "audio" / "train").rglob("*.*"):
        audio.write_bytes(b"not audio")
    manifest = (broken / "train.tsv").read_text().splitlines()
    (broken / "train.tsv").write_text("\n".join([str(broken / "audio"), *manifest[1:]]) + "\n")  # the copy's audio
    run = tmp_path / "run"
    command = [sys.executable, "-m", SPEECH_TRAIN, *speech_args(broken, run, "training.steps=2", "data.on_error=skip")]
    try:
        result = run_bounded(command, env=ENV, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("a run whose every batch is skipped loops forever")
    assert_one_line_error(Outcome(result.returncode, result.stdout, result.stderr), "ended without an optimizer step")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["training.steps=["], ["command line: the value of 'training.steps=['"]),
        (["model.conv_layers=[[32,10,5]"], ["model.conv_layers=[[32,10,5]", "not valid YAML"]),
        (["training.steps=many"], ["training.steps=many", "(key training.steps)"]),
    ],
)
def test_speech_malformed_override_is_one_line(tmp_path, corpus, args, fragments):
    with untouched([tmp_path]):
        outcome = cli(SPEECH_TRAIN, *speech_args(corpus, tmp_path / "run"), *args)
    assert_one_line_error(outcome, *fragments)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("training:\n  steps: [2\n", "bad.yaml: not valid YAML"),
        ("- training\n", "bad.yaml: the file is a list"),
        ("training:\n  nokey: 3\n", "(key training.nokey)"),
    ],
)
def test_speech_malformed_config_file_is_one_line(tmp_path, corpus, marker, text, fragment):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    (tmp_path / "evil.yaml").write_text(python_tag_yaml(marker))
    with untouched([tmp_path]):
        outcome = cli(SPEECH_TRAIN, "--config", bad, f"data.manifest_dir={corpus}", f"training.output_dir={tmp_path}/r")
        evil = cli(SPEECH_TRAIN, "--config", tmp_path / "evil.yaml", f"training.output_dir={tmp_path}/r")
    assert_one_line_error(outcome, fragment)
    assert_one_line_error(evil, "evil.yaml: not valid YAML")


# ------------------------------------------------------------------------------------------------ exports


def test_hf_export_of_a_run_folder_writes_only_its_output(world, tmp_path, speech_run, marker):
    run = copy_run(speech_run, tmp_path / "run")
    plant_pickles(run / "checkpoints" / "step_00000004", marker)
    out = tmp_path / "hf"
    with untouched([world, tmp_path], [out]):
        outcome = cli(HF_EXPORT, run, out)
    assert_success(outcome)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_hf_export_of_another_recipes_run_is_one_line(world, tmp_path, vision_run):
    out = tmp_path / "hf"
    with untouched([world, tmp_path]):
        outcome = cli(HF_EXPORT, vision_run, out)
    assert_one_line_error(outcome)
    assert not out.exists()


def test_hf_export_with_deleted_weights_or_config_is_one_line(world, tmp_path, speech_run):
    run = copy_run(speech_run, tmp_path / "run")
    (run / "config.yaml").unlink()
    for checkpoint in (run / "checkpoints").glob("step_*"):
        (checkpoint / "model.safetensors").unlink()
    out = tmp_path / "hf"
    with untouched([world, tmp_path]), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        outcome = cli(HF_EXPORT, run, out)
    assert_one_line_error(outcome)
    assert not out.exists()


@pytest.mark.parametrize("into", ["checkpoint", "run"])
def test_hf_export_never_writes_into_a_checkpoint_or_run_folder(world, tmp_path, speech_run, into):
    run = copy_run(speech_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step_00000004"
    out = checkpoint if into == "checkpoint" else run
    with untouched([world, tmp_path]):
        outcome = cli(HF_EXPORT, checkpoint, out)
    assert_one_line_error(outcome)


def test_hf_export_of_a_run_whose_config_runs_code_is_one_line(world, tmp_path, speech_run, marker):
    run = copy_run(speech_run, tmp_path / "run")
    (run / "config.yaml").write_text(python_tag_yaml(marker))
    for checkpoint in (run / "checkpoints").glob("step_*"):
        (checkpoint / "config.yaml").write_text(python_tag_yaml(marker))
        set_in_manifest(checkpoint, "config.yaml")
    with untouched([world, tmp_path]):
        outcome = cli(HF_EXPORT, run, tmp_path / "hf")
    assert_one_line_error(outcome)


def test_extract_features_of_a_run_writes_only_its_output(world, tmp_path, corpus, speech_run, marker):
    run = copy_run(speech_run, tmp_path / "run")
    plant_pickles(run / "checkpoints" / "step_00000004", marker)
    out = tmp_path / "features"
    with untouched([world, tmp_path], [out]):
        outcome = cli(EXTRACT, run, corpus / "valid.tsv", out, "--layers", "1", "--no-progress", "--threads", "1")
    assert_success(outcome)
    assert len(json.loads((out / "index.json").read_text())["utterances"]) == 4


@pytest.mark.parametrize("shape", ["vision run", "deleted weights", "missing manifest", "output is a file"])
def test_extract_features_faults_are_one_line(world, tmp_path, corpus, speech_run, vision_run, shape):
    run, manifest, out = copy_run(speech_run, tmp_path / "run"), corpus / "valid.tsv", tmp_path / "features"
    if shape == "vision run":
        run = vision_run
    elif shape == "deleted weights":
        for checkpoint in (run / "checkpoints").glob("step_*"):
            (checkpoint / "model.safetensors").unlink()
    elif shape == "missing manifest":
        manifest = tmp_path / "missing.tsv"
    else:
        out.write_text("a file\n")
    with untouched([world, tmp_path]), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        outcome = cli(EXTRACT, run, manifest, out, "--layers", "1", "--no-progress")
    assert_one_line_error(outcome)


# ------------------------------------------------------------------------------------------------ vision


def test_vision_training_in_a_speech_run_folder_is_one_line(world, tmp_path, speech_run):
    run = copy_run(speech_run, tmp_path / "run")
    with untouched([world, tmp_path]):
        outcome = cli(VISION_TRAIN, *VISION, f"training.output_dir={run}")
    assert_one_line_error(outcome, "written by another recipe (config PretrainConfig)")


def test_vision_evaluate_of_a_run_writes_only_its_output(world, tmp_path, vision_run, marker):
    run = copy_run(vision_run, tmp_path / "run")
    plant_pickles(run / "checkpoints" / "step_00000002", marker)
    out = tmp_path / "eval"
    with untouched([world, tmp_path], [out]):
        outcome = cli(VISION_EVALUATE, "--run-dir", run, "--output-dir", out, *FAST_EVAL)
    assert_success(outcome)
    assert json.loads((out / "step_00000002.json").read_text())["step"] == 2


@pytest.mark.parametrize("shape", ["speech run", "deleted weights", "poisoned weights", "lost config"])
def test_vision_evaluate_faults_are_one_line(world, tmp_path, vision_run, speech_run, marker, shape):
    run = copy_run(vision_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step_00000002"
    if shape == "speech run":
        run = speech_run
    elif shape == "deleted weights":
        (checkpoint / "model.safetensors").unlink()
    elif shape == "poisoned weights":  # the safetensors file swapped for a pickle, the manifest updated to match
        (checkpoint / "model.safetensors").unlink()
        torch.save({"weight": Payload(marker)}, checkpoint / "pytorch_model.bin")
        set_in_manifest(checkpoint, "model.safetensors", "pytorch_model.bin")
    else:
        (run / "config.yaml").unlink()
    with untouched([world, tmp_path]), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        outcome = cli(VISION_EVALUATE, "--run-dir", run, "--output-dir", tmp_path / "eval", *FAST_EVAL)
    assert_one_line_error(outcome)


def test_a_checkpoint_copied_out_of_its_run_loads_with_its_own_config(tmp_path, speech_run):
    """A ``step_*`` folder outside its run (copied away, or set aside under ``checkpoints/abandoned-*``) describes
    itself: ``load_pretrained`` reads the config it carries, not a neighbouring folder's."""
    from simplexvq_recipes.speech.pretraining.model import load_pretrained

    source = speech_run / "checkpoints" / "step_00000002"
    elsewhere = tmp_path / "archive" / "old" / "step_00000002"
    shutil.copytree(source, elsewhere)
    (tmp_path / "archive" / "config.yaml").write_text("data: {image_size: 64}\n")  # a stranger's config nearby
    model, config = load_pretrained(elsewhere)
    _, expected = load_pretrained(source)
    assert config == expected
    assert sum(p.numel() for p in model.parameters()) > 0

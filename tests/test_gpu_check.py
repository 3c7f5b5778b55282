"""The one-shot GPU check (benchmarks/gpu/run.py) and its prepare step, exercised on the CPU.

``--dry-run`` runs every stage at tiny sizes with the Triton kernels in their interpreter; these tests check the
report it writes (JSON and Markdown), that a Triton measurement that fell back to the reference backend fails the
check and says why, and that a small time budget ends the run early with the partial results written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = REPO_ROOT / "benchmarks" / "gpu"

pytest.importorskip("triton")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load("run")
prepare = _load("prepare")


def _check(tmp_path: Path, *options: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", TMPDIR=str(tmp_path))
    empty = tmp_path / "no-wheels"  # CI has no wheels: the peer's column records its import error
    empty.mkdir(exist_ok=True)
    command = [sys.executable, str(GPU_DIR / "run.py"), "--dry-run", "--out", str(tmp_path / "out")]
    command += ["--wheels", str(empty), *options]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / run.JSON_NAME).read_text())


def test_dry_run_writes_the_report(tmp_path):
    done = _check(tmp_path)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    report = _report(tmp_path)
    assert report["mode"] == "dry-run" and report["tests"][0]["returncode"] == 0
    records = report["measurements"]
    layer = [r for r in records if r["stage"] == "layer"]
    assert {(r["method"], r["case"]["dtype"]) for r in layer} == {
        (method, dtype) for method in run.LAYER_METHODS for dtype in ("float16", "float32")
    }
    peer = "vector-quantize-pytorch"
    for record in layer:
        if record["method"] == peer:
            continue  # no wheels here: its import error is a result, never fatal
        assert "error" not in record, record
        assert record["ms"] > 0 and record["stats"]["n"] >= 1 and len(record["samples_ms"]) == record["stats"]["n"]
        assert record["stats"]["min"] <= record["ms"] <= record["stats"]["max"]
    for record in (r for r in layer if r["method"] in ("triton", "triton, no KNN")):
        assert record["fell_back"] is False
        operands = {entry["operands"] for entry in record["kernel_dtypes"].values()}
        assert operands == {record["case"]["dtype"]}, record["kernel_dtypes"]  # the raw backend keeps the dtype
        assert "simplexvq.triton_softmax_rows.default" in record["kernel_dtypes"]  # the launches, forward and backward
        assert len(record["kernel_dtypes"]) >= 3 and all(
            op.startswith("simplexvq.triton_") for op in record["kernel_dtypes"]
        )
    models = [r for r in records if r["stage"] == "model"]
    assert {(r["case"]["model"], r["method"]) for r in models} == {
        (model, backend) for model in ("wav2vec2-base", "vision-64x64x32") for backend in run.MODEL_BACKENDS
    }
    for record in models:
        assert "error" not in record and record["ms"] > 0, record
        if record["method"] == "triton":
            assert record["fell_back"] is False and record["kernel_dtypes"]
    assert report["global_knn"]["status"] == "skipped"
    markdown = (tmp_path / "out" / run.MD_NAME).read_text()
    assert "| N, M, D | six-GEMM floor |" in markdown and "x the floor" in markdown
    assert "| wav2vec2-base |" in markdown and "| vision-64x64x32 |" in markdown
    assert "Dtypes the Triton kernels received" in markdown and "FAILED" not in markdown


def test_a_fallback_fails_the_check_and_says_why(tmp_path):
    done = _check(tmp_path, "--simulate-fallback", "--skip-tests", "--skip-models")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "FAILED: triton at 24, 12, 8 float16 fell back to the reference backend" in done.stderr
    assert "simulated by --simulate-fallback" in done.stderr
    report = _report(tmp_path)
    fallen = {r["method"] for r in report["measurements"] if r.get("fell_back")}
    assert fallen == {"triton", "triton, no KNN", "layer, triton"}
    for record in report["measurements"]:
        if record.get("fell_back"):
            assert "the kernels cannot be imported: simulated by --simulate-fallback" in record["fallback_reason"]
            assert "ms" not in record  # never timed under the label "triton"
        elif record["method"] in ("dense", "reference"):
            assert record["ms"] > 0
    assert "## FAILED: fallback to the reference backend" in (tmp_path / "out" / run.MD_NAME).read_text()


def test_a_small_budget_ends_the_run_early_with_partial_results(tmp_path):
    budget = 30.0
    started = time.monotonic()
    # Each measurement waits 4 s first, so the budget cannot hold them all on however fast a machine.
    done = _check(tmp_path, "--skip-tests", "--budget-s", str(budget), "--simulate-slow-s", "4", timeout=300)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert elapsed < budget + 25  # the interpreter's start-up and the report on top of the budget
    report = _report(tmp_path)
    records = report["measurements"]
    assert len(records) == 2 * len(run.LAYER_METHODS) + 2 * len(run.MODEL_BACKENDS)  # every one accounted for
    measured = [r for r in records if r.get("ms") is not None]
    cut = [r for r in records if r.get("error", "").startswith(("skipped", "timed out"))]
    assert measured, "the cheap measurements at the start fit the budget"
    assert cut, "the budget cannot hold the interpreted kernels and the models"
    assert report["seconds"] <= budget + 5
    markdown = (tmp_path / "out" / run.MD_NAME).read_text()
    assert "## Not measured" in markdown


def test_forecast_scales_the_largest_smaller_measurement():
    case = {"n": 4, "m": 10, "d": 2, "dtype": "float32"}
    records = [
        {"method": "dense", "case": {"n": 2, "m": 10, "d": 2, "dtype": "float32"}, "ms": 100.0},
        {"method": "dense", "case": {"n": 1, "m": 10, "d": 2, "dtype": "float32"}, "ms": 80.0},
        {"method": "dense", "case": {"n": 8, "m": 10, "d": 2, "dtype": "float32"}, "ms": 1.0},
        {"method": "dense", "case": {"n": 2, "m": 10, "d": 2, "dtype": "bfloat16"}, "ms": 1.0},
        {"method": "reference", "case": {"n": 2, "m": 10, "d": 2, "dtype": "float32"}, "ms": 1.0},
    ]
    assert run.forecast_s("dense", case, records) == pytest.approx(0.2)
    assert run.forecast_s("triton", case, records) is None


def _wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any") -> Path:
    """A minimal wheel of one module ``<name>_probe`` that sets ``VALUE = 7``."""
    module = name.replace("-", "_")
    path = folder / f"{module}-{version}-{tag}.whl"
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{module}_probe.py", "VALUE = 7\n")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


def test_wheels_install_offline_and_only_when_missing(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "simplexvq-offline-probe", "1.0")
    _wheel(wheels, "pytest", "0.0.1")  # installed here already: left alone
    site = tmp_path / "site"
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    record = run.install_wheels(wheels, site)
    assert "error" not in record, record
    assert record["installed"] == ["simplexvq_offline_probe-1.0-py3-none-any.whl"]
    assert (site / "simplexvq_offline_probe_probe.py").exists() and str(site) == sys.path[-1]
    assert not (site / "pytest_probe.py").exists()


def test_prepare_checks_the_wheel_folder(tmp_path):
    for requirement in prepare.REQUIREMENTS:
        name, version = requirement.split("==")
        _wheel(tmp_path, name, version)
    assert prepare.check_folder(tmp_path, prepare.REQUIREMENTS) == []
    (tmp_path / "einx-0.4.3-py3-none-any.whl").unlink()
    _wheel(tmp_path, "frozendict", "0.1", tag="cp312-cp312-manylinux_2_17_x86_64")
    problems = prepare.check_folder(tmp_path, prepare.REQUIREMENTS)
    assert any("frozendict-0.1-cp312" in p and "not a pure-Python wheel" in p for p in problems)
    assert any("no wheel for einx==0.4.3" in p for p in problems)
    assert any("several versions of frozendict" in p for p in problems)


def test_the_global_knn_stage_compares_two_ranks_with_one_process(tmp_path):
    """The stage's own script on two gloo ranks (CPU, reference backend): the global loss equals the loss of one
    process holding both shards; with fewer than two GPUs the GPU run records the stage as skipped."""
    assert run.run_global_knn(run.Budget(300), devices=1)["status"] == "skipped"
    result = run.run_global_knn(run.Budget(300), devices=0, cpu=True)
    assert result["status"] == "ok", result
    assert result["backend"] == "reference" and result["fell_back"] is False
    assert result["loss"] == pytest.approx(result["single_process_loss"], rel=1e-4)

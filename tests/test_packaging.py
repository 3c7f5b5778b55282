"""The package installs from a wheel (plain ``pip install .``) with meaningful import names, data and entry points."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = out.glob("simplexvq-*.whl")
    return path


def test_wheel_has_import_names_not_folder_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"simplexvq", "simplexvq_recipes", "simplexvq_vision"}
    assert "simplexvq/functional.py" in names and "simplexvq/fairseq2_extension/__init__.py" in names
    assert not any(name.startswith(("plugin/", "recipes/", "tests/", "vision_adapter/")) for name in names)
    metadata = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "[fairseq2.extension]" in entry_points
    assert "simplexvq.fairseq2_extension:setup_simplexvq_extension" in entry_points


def test_plain_install_imports_from_site_packages(wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import simplexvq, simplexvq_recipes.patch_demo, torch; "
        "assert simplexvq.__file__.startswith(sys.argv[1]), simplexvq.__file__; "
        "q = simplexvq.build_quantizer('softmax-knn_ce', dim=8, codebook_size=4, knn_k=1); "
        "print(q(torch.randn(5, 8)).quantized.shape)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(target)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "torch.Size([5, 8])"


def test_editable_install_points_at_the_source_tree():
    """The set-up (``bash .ci/setup``) installs in editable mode: imports resolve to this checkout."""
    probe = "import simplexvq, simplexvq_recipes; print(simplexvq.__file__, simplexvq_recipes.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    core, recipes = result.stdout.split()
    assert Path(core) == ROOT / "plugin" / "simplexvq" / "__init__.py"
    assert Path(recipes) == ROOT / "recipes" / "simplexvq_recipes" / "__init__.py"

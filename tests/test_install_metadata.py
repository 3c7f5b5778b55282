"""What ``pip install simplexvq[EXTRA]`` brings is what the code imports: every third-party import of a module is
declared by the extra that module belongs to, the speech extra needs no torchaudio, and the wheel carries the
LICENSE and the packaged presets."""

from __future__ import annotations

import ast
import configparser
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DISTRIBUTION_OF_MODULE = {"yaml": "pyyaml", "PIL": "pillow", "skimage": "scikit-image"}
"""Import names that differ from the name pip installs."""

OPTIONAL_IMPORTS = {
    "triton": "the optional GPU backend, imported only when its kernels are first used",
    "fairseq2": "fairseq2-family checkpoints (the fairseq2 extra), imported only when such a run is read",
    "torchaudio": "the optional interop target (export to torchaudio's Wav2Vec2Model)",
}
"""Imports an extra need not declare; each is guarded where it is used."""

MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "plugin/simplexvq/fairseq2_extension": ("fairseq2",),
    "plugin/simplexvq": (),
    "recipes/simplexvq_recipes/__init__.py": (),
    "recipes/simplexvq_recipes/training": ("speech", "vision"),
    "recipes/simplexvq_recipes/speech/downstream/hf_": ("speech", "hf"),
    "recipes/simplexvq_recipes/speech": ("speech",),
    "recipes/simplexvq_recipes/vision": ("vision",),
    "vision_adapter/simplexvq_vision": ("vision",),
    "recipes/simplexvq_recipes/natural_patches.py": ("demo",),
    "recipes/simplexvq_recipes/patch_demo.py": ("demo",),
}
"""Module path prefix -> the extras a user installs to run it (the longest matching prefix wins). ``training`` is
shared: each of ``speech`` and ``vision`` alone must bring all it imports."""


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def _names(lines: str) -> set[str]:
    """Distribution names of requirement lines (``torch>=2.9`` -> ``torch``)."""
    return {re.split(r"[<>=!\[ ;]", line.strip(), maxsplit=1)[0].lower() for line in lines.splitlines() if line.strip()}


def _declared(extra: str | None) -> set[str]:
    config = _setup_cfg()
    core = _names(config["options"]["install_requires"])
    return core if extra is None else core | _names(config["options.extras_require"][extra])


def _third_party_imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    first_party = ("simplexvq", "simplexvq_recipes", "simplexvq_vision", "__future__")
    return {m for m in modules if m not in sys.stdlib_module_names and m not in first_party}


def _group(relative: str) -> tuple[str, ...]:
    prefixes = [prefix for prefix in MODULE_GROUPS if relative.startswith(prefix)]
    assert prefixes, f"{relative} belongs to no group of MODULE_GROUPS: add it"
    return MODULE_GROUPS[max(prefixes, key=len)]


def test_every_third_party_import_is_declared_by_its_extra():
    modules = sorted(
        path
        for folder in ("plugin/simplexvq", "recipes/simplexvq_recipes", "vision_adapter/simplexvq_vision")
        for path in (ROOT / folder).rglob("*.py")
    )
    assert len(modules) > 60
    missing = []
    for path in modules:
        relative = path.relative_to(ROOT).as_posix()
        for extra in _group(relative) or (None,):
            declared = _declared(extra)
            for module in sorted(_third_party_imports(path) - set(OPTIONAL_IMPORTS)):
                if DISTRIBUTION_OF_MODULE.get(module, module).lower() not in declared:
                    missing.append(f"{relative} imports {module}, not declared by the {extra or 'core'} requirements")
    assert not missing, "\n".join(missing)


def test_speech_extra_needs_no_torchaudio_and_brings_the_encoder():
    speech = _declared("speech")
    assert "torchaudio" not in speech
    assert {"transformers", "soxr", "soundfile", "editdistance"} <= speech
    assert any(
        line.strip() == "transformers>=4.57" for line in _setup_cfg()["options.extras_require"]["speech"].splitlines()
    )


def test_install_doc_names_the_torchvision_of_each_torch():
    """torchvision pins one torch release: docs/install.md says which torchvision goes with which torch."""
    text = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    for torch_version, torchvision_version in [("2.9", "0.24"), ("2.13", "0.28")]:
        assert re.search(rf"\|\s*{re.escape(torch_version)}(\.\d+)?\s*\|\s*{re.escape(torchvision_version)}", text), (
            torch_version,
            torchvision_version,
        )


def test_license_is_mit():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 simplexvq contributors" in text
    assert _setup_cfg()["metadata"]["license"] == "MIT"


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = out.glob("simplexvq-*.whl")
    return zipfile.ZipFile(path).namelist()


def test_wheel_carries_license_and_presets(wheel_names):
    assert any(re.fullmatch(r"simplexvq-[^/]+\.dist-info/(licenses/)?LICENSE", name) for name in wheel_names)
    presets = {name for name in wheel_names if name.startswith("simplexvq_recipes/configs/")}
    for family in ("speech", "vision"):
        assert any(
            name.startswith(f"simplexvq_recipes/configs/{family}/") and name.endswith(".yaml") for name in presets
        )

"""Put every wheel the one-shot GPU check needs into ``benchmarks/gpu/wheels/`` (git-ignored), for a GPU machine
without a package registry.

The GPU machine has Python 3.12, torch, triton, transformers, timm and accelerate but maybe not pytest, nor
vector-quantize-pytorch (the peer in the layer's table) and its dependencies, nor omegaconf (the recipes'
configuration, imported by the model builders the check uses). Run here, with network access to
PyPI::

    python benchmarks/gpu/prepare.py            # downloads the pinned pure-Python wheels, then checks the folder

``run.py`` installs from the folder offline (``pip install --no-index --find-links``), only the distributions the
machine lacks, so nothing installed there is replaced. Every wheel must be pure Python (``py3-none-any``), so
the folder serves any platform; the script fails naming a wheel that is not.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

WHEELS = Path(__file__).resolve().parent / "wheels"

REQUIREMENTS: tuple[str, ...] = (
    # the test stage
    "pytest==9.2.0",
    "pluggy==1.7.0",
    "iniconfig==2.3.1",
    "packaging==26.4",
    "pygments==2.21.0",
    # the peer of the layer's table and what it imports (numpy and sympy come with torch)
    "vector-quantize-pytorch==1.34.1",
    "einops==0.8.2",
    "einx==0.4.3",
    "frozendict==2.5.1",
    "loguru==0.8.0",
    "torch-einops-utils==0.2.9",
    # the recipes' configuration (their model builders import it; PyYAML is there)
    "omegaconf==2.4.0",
)
"""Pinned pure-Python distributions, each with its own dependencies listed (``--no-deps`` keeps torch out)."""


def download(requirements: tuple[str, ...], folder: Path, python_version: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", python_version, "--implementation", "py", "--abi", "none", "--platform", "any"]
    command += ["-d", str(folder), *requirements]
    subprocess.run(command, check=True)


def check_folder(folder: Path, requirements: tuple[str, ...]) -> list[str]:
    """Problems with the folder: a wheel that is not pure Python, a pinned distribution missing, two versions."""
    problems = []
    names: dict[str, list[str]] = {}
    for wheel in sorted(folder.glob("*.whl")):
        if not wheel.name.endswith("-none-any.whl"):
            problems.append(f"{wheel.name} is not a pure-Python wheel (py3-none-any): it may not install there")
        names.setdefault(wheel.name.split("-")[0].lower().replace("_", "-"), []).append(wheel.name)
    for requirement in requirements:
        name = requirement.split("==")[0].lower()
        if name not in names:
            problems.append(f"no wheel for {requirement} in {folder}")
    problems += [f"several versions of {name}: {', '.join(files)}" for name, files in names.items() if len(files) > 1]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=str(WHEELS), help="where the wheels go (default: benchmarks/gpu/wheels)")
    parser.add_argument("--python-version", default="3.12", help="Python of the GPU machine")
    parser.add_argument("--check-only", action="store_true", help="only check the folder")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not args.check_only:
        download(REQUIREMENTS, folder, args.python_version)
    problems = check_folder(folder, REQUIREMENTS)
    for problem in problems:
        print(f"prepare.py: {problem}", file=sys.stderr)
    if not problems:
        size = sum(f.stat().st_size for f in folder.glob("*.whl")) / 2**20
        print(f"{len(list(folder.glob('*.whl')))} wheels, {size:.1f} MiB, in {folder}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

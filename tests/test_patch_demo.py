"""The patch demo's data and quantizer settings: one offline photo split, any core option through the spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import simplexvq
from simplexvq_recipes import natural_patches, patch_demo
from simplexvq_recipes.vision import photos


def test_one_photo_split_shared_by_the_patch_demo_and_the_vision_recipe():
    train = {*natural_patches.TRAIN_PHOTOS, *photos.SKIMAGE_TRAIN, *photos.OPENCV_DOC_TRAIN}
    val = {*natural_patches.VAL_PHOTOS, *photos.SKIMAGE_VAL, *photos.OPENCV_DOC_VAL}
    assert not train & val, f"photos on both sides of the split: {sorted(train & val)}"
    assert photos.SKIMAGE_TRAIN == natural_patches.TRAIN_PHOTOS and photos.SKIMAGE_VAL == natural_patches.VAL_PHOTOS
    assert len(set(natural_patches.TRAIN_PHOTOS)) == len(natural_patches.TRAIN_PHOTOS) >= 5
    assert len(set(natural_patches.VAL_PHOTOS)) == len(natural_patches.VAL_PHOTOS) >= 3


@pytest.fixture(scope="module")
def few_patches():
    """A small slice of the real patches: enough for a few training steps and a usage count."""
    splits = natural_patches.load_patch_splits(patch_size=4)
    return natural_patches.PatchSplits(train=splits.train[:2048], val=splits.val[:1024], patch_size=4)


def test_every_core_option_reaches_the_demo_quantizer():
    spec = patch_demo.demo_quantizer().replace(knn_k=3, memory_efficient=True, chunk_size=128, knn_scope="local")
    config = patch_demo.DemoConfig(quantizer=spec, latent_dim=8)
    built = patch_demo.PatchAutoencoder(48, config).quantizer.config
    assert built == spec.config(dim=8)
    assert (built.knn_k, built.memory_efficient, built.chunk_size, built.codebook_size) == (3, True, 128, 64)

    hard = patch_demo.DemoConfig(method="ste-euclid")  # the shorthand replaces the method, keeps the options
    assert hard.quantizer == patch_demo.demo_quantizer().replace(method="ste-euclid")
    built = patch_demo.PatchAutoencoder(48, hard).quantizer.config
    assert (built.method, built.regularizer, built.distance) == ("ste", "none", "euclid")
    with pytest.raises(ValueError, match="quantizer.codebook_size must be set"):
        patch_demo.DemoConfig(quantizer=simplexvq.QuantizerSpec(method="softmax-knn_ce", groups=1))


def test_demo_configs_apply_command_line_options_to_every_method_with_core_messages():
    base = patch_demo.DemoConfig()
    configs = patch_demo.demo_configs(["softmax-knn_ce", "simvq"], base, [("groups", 2), ("knn_k", 2)])
    assert [c.quantizer.method for c in configs] == ["softmax-knn_ce", "simvq"]
    assert all((c.quantizer.groups, c.quantizer.knn_k, c.quantizer.codebook_size) == (2, 2, 64) for c in configs)
    assert patch_demo.parse_option("memory_efficient=true") == ("memory_efficient", True)
    assert patch_demo.parse_option("vertex_subsample=null") == ("vertex_subsample", None)
    with pytest.raises(ValueError, match="Did you mean 'knn_k'"):
        patch_demo.demo_configs(["softmax-knn_ce"], base, [("knn_kk", 2)])
    with pytest.raises(ValueError, match="quantizer 'ste-euclid': .*memory_efficient"):
        patch_demo.demo_configs(["softmax-knn_ce", "ste-euclid"], base, [("memory_efficient", True)])
    with pytest.raises(KeyError, match="Did you mean 'softmax-knn_ce'"):
        patch_demo.demo_configs(["softmax-knn_c"], base)


def test_demo_command_takes_quantizer_options_and_records_the_spec(few_patches, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(patch_demo, "load_patch_splits", lambda: few_patches)
    out = tmp_path / "results.json"
    argv = ["--steps", "2", "--methods", "softmax-knn_ce", "--json", str(out)]
    results = patch_demo.main([*argv, "--quantizer-option", "groups=2", "chunk_size=64", "memory_efficient=true"])
    assert "quantizer options: codebook_size=64 groups=2 knn_k=4 memory_efficient=True chunk_size=64" in (
        capsys.readouterr().out
    )
    saved = json.loads(out.read_text())
    assert (
        saved[0]["quantizer"]
        == results[0].quantizer
        == {
            "method": "softmax-knn_ce",
            "codebook_size": 64,
            "groups": 2,
            "knn_k": 4,
            "memory_efficient": True,
            "chunk_size": 64,
        }
    )
    with pytest.raises(SystemExit):
        patch_demo.main(["--methods", "ste-euclid", "--quantizer-option", "memory_efficient=true"])
    assert "quantizer 'ste-euclid'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        patch_demo.main(["--quantizer-option", "knn_k"])
    assert "expected NAME=VALUE" in capsys.readouterr().err


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_demo_table() -> list[str]:
    """The lines of the README's patch-demo table (header first)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    header = patch_demo.format_table([], 64).splitlines()[0]
    assert header in lines, "the README's patch-demo table has another header than the command prints"
    start = lines.index(header)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip("|").split("|")]


CROSS_CPU_TOLERANCE = {"codes": 3, "perplexity": 0.25, "rmse": 0.10}
"""How far a fresh run on another x86-64 CPU may land from the README's row (code use: codes of the 64, also
for the per-block use; perplexity and rMSE: relative). Another CPU takes other vectorised code paths (ATen's
AVX-512 / AVX2 / default kernels, MKL's), whose last-bit differences grow over 400 training steps. Measured on one
CPU by forcing the other paths (default; ATEN_CPU_CAPABILITY=default; MKL_CBWR=COMPATIBLE) and against the README's
row: ste-euclid moves only in rMSE (0.0851 / 0.0853), softmax-knn_ce by up to 2 codes of val use (93.8-96.9%),
0.8 points of per-block use, 17% in perplexity (20.4-23.9) and 6% in rMSE (0.0995-0.1058). The tolerance is about
1.5 times that spread: any CPU passes, while a collapse (ste-euclid: 19% val use) or a broken reconstruction (0.31)
still fails."""


def _beyond_cross_cpu_tolerance(quoted: list[str], fresh: list[str]) -> list[str]:
    """The columns of a README row (cells) that a fresh run's row leaves the tolerance on."""
    codes = 100.0 * CROSS_CPU_TOLERANCE["codes"] / 64
    problems = [f"method {quoted[0]} != {fresh[0]}"] if quoted[0] != fresh[0] else []
    for column in (1, 2, 3):  # train code use, val code use, val per-block use (percent)
        if abs(float(quoted[column].rstrip("%")) - float(fresh[column].rstrip("%"))) > codes + 1e-9:
            problems.append(f"column {column}: {quoted[column]} vs {fresh[column]} (more than {codes:.1f} points)")
    for column, key in ((4, "perplexity"), (5, "rmse")):
        if abs(float(quoted[column]) - float(fresh[column])) > CROSS_CPU_TOLERANCE[key] * float(quoted[column]):
            problems.append(f"{key}: {quoted[column]} vs {fresh[column]} (more than {CROSS_CPU_TOLERANCE[key]:.0%})")
    return problems


def test_cross_cpu_tolerance_passes_the_measured_spread_and_fails_a_collapse():
    readme_knn = ["softmax-knn_ce", "100.0%", "95.3%", "24.5%", "23.9", "0.0998"]
    for other_cpu in (["100.0%", "96.9%", "24.7%", "20.4", "0.1058"], ["100.0%", "93.8%", "23.9%", "21.7", "0.0995"]):
        assert _beyond_cross_cpu_tolerance(readme_knn, ["softmax-knn_ce", *other_cpu]) == []
    collapsed = ["softmax-knn_ce", "20.3%", "18.8%", "6.3%", "5.5", "0.0998"]
    assert len(_beyond_cross_cpu_tolerance(readme_knn, collapsed)) == 4
    assert _beyond_cross_cpu_tolerance(readme_knn, [*readme_knn[:5], "0.3107"]) == [
        "rmse: 0.0998 vs 0.3107 (more than 10%)"
    ]


def test_readme_demo_table_is_what_a_fresh_run_prints():
    """Two rows (a collapsing and a KNN one) of a fresh run match the README's within :data:`CROSS_CPU_TOLERANCE`."""
    table = readme_demo_table()
    rows = {_cells(row)[0]: row for row in table[2:]}
    assert list(rows) == list(patch_demo.TABLE1_METHODS), "the README lists every default method, in order"
    data = natural_patches.load_patch_splits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ("ste-euclid", "softmax-knn_ce"):
            fresh = patch_demo.train_and_evaluate(patch_demo.DemoConfig(method=method), data)
            expected = _cells(patch_demo.format_table([fresh], 64).splitlines()[2])
            problems = _beyond_cross_cpu_tolerance(_cells(rows[method]), expected)
            assert not problems, f"README row {method} vs a fresh run {expected}: {problems}"
    finally:
        torch.set_num_threads(threads)

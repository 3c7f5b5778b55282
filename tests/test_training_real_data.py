"""A short training run on real photo patches: KNN-CE uses the whole codebook, a collapse-prone baseline does not."""

from __future__ import annotations

import json

import pytest

from simplexvq_recipes import patch_demo
from simplexvq_recipes.natural_patches import TRAIN_PHOTOS, VAL_PHOTOS, load_patch_splits


@pytest.fixture(scope="module")
def patches():
    return load_patch_splits(patch_size=4)


def test_photo_splits_are_disjoint_real_data(patches):
    assert not set(TRAIN_PHOTOS) & set(VAL_PHOTOS)
    assert patches.train.shape[1] == patches.val.shape[1] == 48
    assert len(patches.train) > 50_000 and len(patches.val) > 20_000
    assert 0.0 <= float(patches.train.min()) and float(patches.train.max()) <= 1.0
    assert float(patches.train.std()) > 0.1  # real photos, not a constant image


def test_knn_ce_reaches_full_code_usage_where_ste_collapses(patches):
    untrained = patch_demo.train_and_evaluate(patch_demo.DemoConfig(method="softmax-knn_ce", steps=0), patches)
    knn = patch_demo.train_and_evaluate(patch_demo.DemoConfig(method="softmax-knn_ce", steps=300), patches)
    ste = patch_demo.train_and_evaluate(patch_demo.DemoConfig(method="ste-euclid", steps=300), patches)

    assert knn.train_usage == 1.0, f"KNN-CE should use every code on the training photos, used {knn.train_usage:.1%}"
    assert knn.usage >= 0.9, f"KNN-CE validation code use {knn.usage:.1%}"
    assert ste.train_usage <= 0.5, f"STE was expected to collapse, but used {ste.train_usage:.1%} of the codes"
    assert knn.rmse < 0.5 * untrained.rmse, (knn.rmse, untrained.rmse)


def test_demo_command_prints_table_and_writes_json(patches, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(patch_demo, "load_patch_splits", lambda: patches)
    out = tmp_path / "results.json"
    results = patch_demo.main(["--steps", "3", "--methods", "softmax-knn_ce", "simvq", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| softmax-knn_ce |" in printed and "| simvq |" in printed
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved] == ["softmax-knn_ce", "simvq"] == [r.method for r in results]
    assert all(0.0 < r["usage"] <= 1.0 for r in saved)

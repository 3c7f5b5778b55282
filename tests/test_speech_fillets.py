"""The demo on real speech: the fillets-ng corpus (Debian packages) and KNN-CE against a collapsing baseline.

Needs ``apt-get install -y fillets-ng-data-cs fillets-ng-data-nl`` (CI installs them); uses four training levels
and one held-out level so it runs in well under a minute.
"""

from __future__ import annotations

import json

import pytest
import soundfile as sf

from simplexvq_recipes.speech import demo
from simplexvq_recipes.speech.data import prepare_fillets
from simplexvq_recipes.speech.data.manifest import read_manifest

TRAIN_LEVELS = ("airplane", "alibaba", "atlantis", "aztec")
VALID_LEVEL = "bathroom"

pytestmark = pytest.mark.skipif(
    not any(prepare_fillets.SOURCE.glob("*/cs/*.ogg")),
    reason=f"fillets-ng speech not installed: apt-get install -y {prepare_fillets.PACKAGES}",
)


@pytest.fixture(scope="module")
def fillets_subset(tmp_path_factory):
    out = tmp_path_factory.mktemp("fillets")
    prepare_fillets.prepare(out, levels=[*TRAIN_LEVELS, VALID_LEVEL], jobs=2)
    return out


def test_prepare_converts_to_16k_mono_and_holds_out_levels(fillets_subset):
    train, valid = read_manifest(fillets_subset / "train.tsv"), read_manifest(fillets_subset / "valid.tsv")
    sources = prepare_fillets.find_sources(levels=[*TRAIN_LEVELS, VALID_LEVEL])
    assert len(train) + len(valid) == len(sources)  # none of these levels has an empty file
    assert {e.path.split("/")[0] for e in train.entries} == set(TRAIN_LEVELS)
    assert {e.path.split("/")[0] for e in valid.entries} == {VALID_LEVEL}
    assert {e.path.split("/")[1] for e in train.entries} == {"cs", "nl"}
    for manifest in (train, valid):
        for index in range(0, len(manifest), 17):
            info = sf.info(str(manifest.audio_path(index)))
            assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
            assert info.frames == manifest.entries[index].num_samples
    hours = sum(e.num_samples for e in train.entries) / 16000 / 3600
    assert 0.1 < hours < 0.5  # real speech: about 10 minutes in these levels
    # re-running keeps the converted files and rewrites identical manifests
    before = (fillets_subset / "train.tsv").read_text()
    prepare_fillets.prepare(fillets_subset, levels=[*TRAIN_LEVELS, VALID_LEVEL], jobs=1)
    assert (fillets_subset / "train.tsv").read_text() == before


def test_a_corpus_converted_another_way_is_converted_again(tmp_path, capsys):
    """Kept files must be what this version writes: a folder without (or with another) ``conversion.json``, as
    converted by an earlier resampler, is converted again; with the same one its files are kept."""
    levels, languages = ["elevator1", VALID_LEVEL], ["nl"]
    with pytest.warns(UserWarning, match="holds no audio frames"):
        prepare_fillets.prepare(tmp_path, levels=levels, languages=languages, jobs=1)
    stamp = tmp_path / prepare_fillets.CONVERSION_FILE
    assert json.loads(stamp.read_text()) == prepare_fillets.conversion()
    converted = read_manifest(tmp_path / "valid.tsv").audio_path(0)
    original = converted.read_bytes()
    data, rate = sf.read(converted)
    sf.write(converted, 0.5 * data, rate, format="FLAC", subtype="PCM_16")  # a file made some other way
    altered = converted.read_bytes()
    with pytest.warns(UserWarning, match="holds no audio frames"):
        prepare_fillets.prepare(tmp_path, levels=levels, languages=languages, jobs=1)
    assert converted.read_bytes() == altered  # same conversion: kept
    stamp.unlink()  # a folder from before conversion.json existed
    with pytest.warns(UserWarning, match="holds no audio frames"):
        prepare_fillets.prepare(tmp_path, levels=levels, languages=languages, jobs=1)
    assert converted.read_bytes() == original and stamp.is_file()
    assert f"converting {tmp_path / 'audio'} again" in capsys.readouterr().out


def test_the_demo_converts_a_cached_corpus_made_another_way_again(fillets_subset, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(prepare_fillets, "prepare", lambda out, **kwargs: calls.append(out))
    assert prepare_fillets.is_converted(fillets_subset)
    assert demo.ensure_corpus(fillets_subset) == fillets_subset and calls == []
    old = tmp_path / "old-cache"  # manifests and audio as an earlier version left them: no conversion.json
    old.mkdir()
    for name in ("train.tsv", "valid.tsv"):
        (old / name).write_text((fillets_subset / name).read_text())
    assert not prepare_fillets.is_converted(old)
    demo.ensure_corpus(old)
    assert calls == [old]


def test_validation_levels_are_every_tenth_level():
    languages = prepare_fillets.LANGUAGES
    levels = sorted(
        p.name for p in prepare_fillets.SOURCE.iterdir() if any(any(p.glob(f"{lang}/*.ogg")) for lang in languages)
    )
    assert tuple(levels[5::10]) == prepare_fillets.VALID_LEVELS


def test_empty_source_files_are_left_out_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="zd1-m-cesta.ogg: the file holds no audio frames"):
        prepare_fillets.prepare(tmp_path, levels=["elevator1", VALID_LEVEL], languages=["nl"], jobs=1)
    assert "zd1-m-cesta" not in (tmp_path / "train.tsv").read_text()


def test_demo_knn_ce_keeps_every_code_while_ste_collapses(fillets_subset, tmp_path, capsys):
    """The demo's two runs on a fifth of the corpus, at twice its learning rate so STE collapses within 60 steps."""
    results = demo.main(
        [
            "--steps",
            "60",
            "--corpus",
            str(fillets_subset),
            "--out",
            str(tmp_path),
            "--parallel",
            "2",
            "optim.lr=2e-3",
            "training.eval_every=60",
            "training.checkpoint_every=60",
        ]
    )
    by_method = {r["quantizer"]: r for r in results}
    knn, ste = by_method["softmax-knn_ce"], by_method["ste-cosine"]
    assert knn["val_usage"][0] >= 0.95, knn
    assert ste["val_usage"][0] <= 0.3, ste
    printed = capsys.readouterr().out
    assert "| softmax-knn_ce |" in printed and "| ste-cosine |" in printed
    assert "collapsed codebook makes the contrastive task trivial" in printed
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "ste-cosine" / "code_usage.png").is_file()

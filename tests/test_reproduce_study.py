"""The reproduction-study driver (benchmarks/reproduce.py): its grid, that every run's settings are valid recipe
configurations, and the tables and plots it writes from finished runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

import simplexvq
from simplexvq_recipes.speech.pretraining.config import PretrainConfig, preset_path
from simplexvq_recipes.training.config import load_config
from simplexvq_recipes.vision.config import VisionRecipeConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def settings(study, tmp_path):
    return study.Settings(corpus=tmp_path / "corpus", out=tmp_path / "runs")


def test_tables_hold_every_row_of_the_papers_tables_and_simvq_on_both_codebook_settings(study, settings):
    # Tables 1 and 2: STE and RE x {Euclid, Cosine} (4 rows) + {H-Gmb, S-Gmb, Softmax} x {PPL, KNN-L2, KNN-CE} (9)
    assert len(study.TABLE_METHODS) == 4 + 9 + 1 and set(study.TABLE_METHODS) <= set(simplexvq.available_quantizers())
    speech = study.study_runs("speech", settings)
    assert {(run.label["method"], run.label["codebooks"]) for run in speech} == {
        (method, codebooks) for method in study.TABLE_METHODS for codebooks in ("1x1024", "2x320")
    }
    vision = study.study_runs("vision", settings)
    assert [run.label["method"] for run in vision] == list(study.TABLE_METHODS)


def _speech_config(run) -> PretrainConfig:
    return load_config(PretrainConfig, preset_path("tiny"), list(run.overrides))


def test_every_speech_run_is_a_valid_recipe_configuration_with_the_intended_setting(study, settings):
    speech = [name for name in study.STUDIES if study.study_runs(name, settings)[0].recipe == "speech"]
    assert "codebook" in speech and "vision" not in speech and "large_codebook" not in speech
    runs = {name: study.study_runs(name, settings) for name in speech}
    for study_runs in runs.values():
        for run in study_runs:
            config = _speech_config(run)
            quantizer = config.model.quantizer
            assert quantizer.method == run.label["method"]
            quantizer.build(dim=config.model.quantizer_dim)  # the library accepts it
            if "K" in run.label:
                assert quantizer.knn_k == run.label["K"]
            if "batch" in run.label:
                assert config.data.batch_size == run.label["batch"]
            if "M" in run.label:
                assert quantizer.codebook_size == run.label["M"]
            if "scope" in run.label:
                assert run.processes == 2 and quantizer.knn_scope == run.label["scope"]
            if "vertices per step" in run.label and run.label["vertices per step"] < quantizer.codebook_size:
                assert quantizer.vertex_subsample == run.label["vertices per step"]
            if "steps" in run.label:
                assert config.training.steps == run.label["steps"] and config.training.eval_every < run.label["steps"]
            if "tau" in run.label and run.label["tau"] != 1.0:
                tau = run.label["tau"]
                assert dataclasses.asdict(quantizer.gumbel_temperature) == {"start": tau, "end": tau, "decay": 1.0}
    # the 1 x 1024 table setting holds N > K M masked frames: 24 crops of 4 s at 50 Hz, ~49% masked
    table = _speech_config(study.speech_run(settings, "softmax-knn_ce"))
    frames = table.data.batch_size * table.data.crop_samples / 320
    masked = frames * (1 - (1 - table.model.mask_prob) ** table.model.mask_length)
    assert masked > table.model.quantizer.knn_k * table.model.quantizer.codebook_size
    # identical settings share one run folder across studies, different settings never do
    every = [run for study_runs in runs.values() for run in study_runs]
    by_key = {}
    for run in every:
        assert by_key.setdefault(run.key, run.overrides) == run.overrides, run.key


def test_every_vision_run_is_a_valid_recipe_configuration(study, settings):
    for run in study.study_runs("vision", settings):
        config = load_config(VisionRecipeConfig, study.VISION_CONFIG, list(run.overrides))
        config.validate()
        assert config.model.quantizer.method == run.label["method"]
        assert config.model.latent_shape(config.data.image_size) == (8, 8, 32) and config.model.codebook_size == 1024
        assert config.data.batch_size * 8 * 8 == config.model.quantizer.knn_k * config.model.codebook_size  # N = K M


def test_commands_use_the_recipes_and_torchrun_for_two_process_runs(study, settings):
    single = study.speech_run(settings, "ste-cosine")
    command = study.command(single, settings)
    assert command[1:3] == ["-m", "simplexvq_recipes.speech.pretraining.train"]
    assert f"training.output_dir={settings.out / single.key}" in command
    scoped = study.study_runs("scope", settings)[-1]
    command = study.command(scoped, settings)
    assert command[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in command
    vision = study.command(study.vision_run(settings, "simvq"), settings)
    assert vision[1:5] == ["-m", "simplexvq_recipes.vision.train", "--config", str(study.VISION_CONFIG)]


def _fake_speech_outcome(usage: list[float], curve: list[float]) -> dict:
    history = [{"step": 10.0 * (i + 1), "train/usage": u} for i, u in enumerate(curve)]
    history.append({"step": 20.0, "train/individual_perplexity": 3.5})
    results = {
        "val_usage": usage,
        "val_perplexity": [10.0] * len(usage),
        "val_dead_codes": [3.0] * len(usage),
        "val_contrastive": 2.5,
        "val_accuracy": 0.25,
        "codebook_size": 1024,
        "val_frames": [1000.0] * len(usage),
        "step": 20,
        "train_seconds": 80.0,
    }
    return {"results": results, "history": history, "wall_seconds": 90.0}


def test_study_tables_json_and_plot_from_finished_runs(study, settings, tmp_path):
    runs = study.study_runs("k", settings)[:2]
    outcomes = {runs[0].key: _fake_speech_outcome([0.5], [0.9, 0.6]), runs[1].key: _fake_speech_outcome([1.0], [1.0])}
    results = tmp_path / "results"
    table = study.write_study("k", runs, outcomes, settings, results)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| method | codebooks | K | code use (val) |") and len(lines) == 4
    assert "| softmax-knn_ce | 1x1024 | 1 | 50.0% |" in lines[2] and "| 3.50 |" in lines[2]
    assert "| 1.5 |" in lines[2]  # minutes
    payload = json.loads((results / "k.json").read_text())
    assert [row["K"] for row in payload["rows"]] == [1, 2] and len(payload["commands"]) == 2
    assert payload["rows"][0]["train_individual_perplexity"] == [3.5]
    assert (results / "k.png").read_bytes()[:4] == b"\x89PNG"
    assert (results / "k.md").read_text().endswith(table)
    # a failed run is left out of the table instead of stopping the report
    partial = study.write_study("k", runs, {runs[1].key: outcomes[runs[1].key]}, settings, results)
    assert len(partial.strip().splitlines()) == 3


def test_a_hard_method_reports_individual_perplexity_one(study, settings):
    run = study.speech_run(settings, "ste-euclid")
    outcome = _fake_speech_outcome([0.25], [0.5])
    outcome["history"] = [row for row in outcome["history"] if "train/individual_perplexity" not in row]
    row = study.speech_row(run, outcome)
    assert row["train_individual_perplexity"] == [1.0]  # one-hot assignments
    assert math.isclose(row["val_code_use"][0], 0.25) and row["wall_seconds"] == 90.0
    outcome["wall_seconds"] = math.nan  # the driver did not see this run end: the training loop's own time
    assert study.speech_row(run, outcome)["wall_seconds"] == 80.0


# ------------------------------------------------------------------------------------------ large-codebook study


@pytest.fixture(scope="module")
def patch_script():
    spec = importlib.util.spec_from_file_location("large_codebook", REPO / "benchmarks" / "large_codebook.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["large_codebook"] = module
    spec.loader.exec_module(module)
    return module


def test_large_codebook_grid_covers_every_size_and_method_with_valid_quantizers(study, settings, patch_script):
    runs = study.study_runs("large_codebook", settings)
    seed0 = {(run.label["method"], run.label.get("weight"), run.label["M"]) for run in runs if run.label["seed"] == 0}
    sizes = (1024, 4096, 16384, 65536)
    baselines = {(method, None, m) for method in study.PATCH_METHODS[1:] for m in sizes}
    assert seed0 == {("softmax-knn_ce", w, m) for w in study.HEADLINE_WEIGHTS for m in sizes} | baselines
    knn = [run for run in runs if run.label["method"] == "softmax-knn_ce"]
    assert {(run.label["weight"], run.label["M"], run.label["seed"]) for run in knn} == {
        (w, m, seed)
        for w in study.HEADLINE_WEIGHTS
        for m in sizes
        for seed in range(settings.seeds)
        if seed == 0 or m <= study.SEEDED_UP_TO
    }
    for run in runs + study.study_runs("large_codebook_levers", settings):
        args = dict(
            arg.removeprefix("--").split("=", 1) for arg in run.overrides if arg.startswith("--") and "=" in arg
        )
        options = (
            dict(o.split("=", 1) for o in run.overrides[run.overrides.index("--option") + 1 :])
            if ("--option" in run.overrides)
            else {}
        )
        config = patch_script.RunConfig(
            method=args["method"],
            codebook_size=int(args["codebook-size"]),
            rows=int(args["rows"]),
            steps=int(args["steps"]),
            knn_k=int(args["knn-k"]),
            options={k: patch_script.parse_option(f"{k}={v}")[1] for k, v in options.items()},
        )
        quantizer = config.demo_config().quantizer  # the core accepts it
        assert quantizer.codebook_size == run.label["M"] and quantizer.knn_k == run.label["K"]
        if run.label["method"] == "softmax-knn_ce":
            assert quantizer.memory_efficient and quantizer.backend == "cpu"
            assert (quantizer.regularizer_weight or 1.0) == run.label["weight"]  # None: the default, 1
    # seed 0 of KNN-CE at every M starts first, and every seed-0 row before any extra seed
    ordered = sorted({run.key: run for run in runs}.values(), key=lambda run: run.priority)
    first = len(study.HEADLINE_WEIGHTS) * len(sizes)
    assert {(run.label["method"], run.label["seed"]) for run in ordered[:first]} == {("softmax-knn_ce", 0)}
    first_extra_seed = next(i for i, run in enumerate(ordered) if run.label["seed"] > 0)
    assert all(run.label["seed"] == 0 for run in ordered[:first_extra_seed]) and first_extra_seed == len(seed0)
    command = study.command(runs[0], settings)
    assert command[1] == str(study.LARGE_CODEBOOK_SCRIPT) and f"--output-dir={settings.out / runs[0].key}" in command


def test_levers_span_n_over_k_m_at_fixed_rows_seen(study, settings):
    levers = study.study_runs("large_codebook_levers", settings)
    fixed = [run for run in levers if run.label.get("lever") == "N at fixed rows seen"]
    assert len({run.label["N"] * run.label["steps"] for run in fixed}) == 1
    ratios = sorted(run.label["N"] / (run.label["K"] * run.label["M"]) for run in fixed)
    assert ratios[0] < ratios[-1] <= 1 and len(ratios) == 3
    by_lever = {}
    for run in levers:
        by_lever.setdefault(run.label["lever"], []).append(run)
    assert sorted(run.label["weight"] for run in by_lever["weight"]) == [1.0, 4.0, 16.0]
    constant, longer = by_lever["constant LR"], by_lever["4x steps, constant LR"]
    assert [run.label["schedule"] for run in constant + longer] == ["constant", "constant"]
    assert longer[0].label["steps"] == 4 * constant[0].label["steps"] and longer[0].label["M"] == 65536
    two = [run for run in levers if run.processes == 2]
    assert len(two) == 2 and {run.overrides[-1] for run in two} == {"knn_scope=local", "knn_scope=global"}
    # a folder is shared exactly by runs with the same command line (the headline point of two lever curves)
    assert len({run.key for run in levers}) == len({run.overrides + (run.processes,) for run in levers}) == 11


@pytest.mark.parametrize(
    "method, options",
    [("softmax-knn_ce", {"memory_efficient": True}), ("softmax-perplexity", {}), ("ste-cosine", {}), ("simvq", {})],
)
def test_held_out_fast_codes_match_the_quantizers_eval_forward(patch_script, method, options):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = patch_script.RunConfig(method=method, codebook_size=64, rows=32, steps=1, options=options)
    model = patch_script.PatchAutoencoder(12, config.demo_config()).eval()
    with torch.no_grad():
        latents = torch.randn(300, config.latent_dim)
        reference = model.quantizer(latents)
        indices = patch_script.hard_codes(model.quantizer, latents)
        assert torch.equal(indices, reference.indices)
        torch.testing.assert_close(model.quantizer.decode(indices), reference.quantized)


def test_the_split_holds_out_whole_blocks_of_every_photo_and_no_pixel_is_on_both_sides(patch_script):
    torch = pytest.importorskip("torch")
    from simplexvq_recipes.natural_patches import load_photo

    size = 8
    image = torch.from_numpy(load_photo("coins")).permute(2, 0, 1)
    held = patch_script.held_out_pixels(*image.shape[1:])
    assert 0.3 < held.float().mean().item() < 0.37  # one 64 x 64 block in three
    width = image.shape[2] - size + 1
    sides = {region: patch_script.OverlappingPatches(("coins",), size, region) for region in patch_script.REGIONS}
    for region, patches in sides.items():
        flat = torch.linspace(0, len(patches) - 1, 200).long()
        for patch, position in zip(patches.gather(flat), patches.positions[0][flat], strict=True):
            y, x = divmod(int(position), width)
            assert torch.equal(patch, image[:, y : y + size, x : x + size].reshape(-1))
            window = held[y : y + size, x : x + size]
            assert bool(window.all()) if region == "held_out" else not bool(window.any())
    # every patch wholly inside one side is on it: those across a border are the only ones left out
    positions = (image.shape[1] - size + 1) * width
    across = sum(
        1
        for y in range(0, image.shape[1] - size + 1, 7)
        for x in range(0, width, 7)
        if 0 < int(held[y : y + size, x : x + size].sum()) < size * size
    )
    sampled = len(range(0, image.shape[1] - size + 1, 7)) * len(range(0, width, 7))
    left_out = 1 - (len(sides["train"]) + len(sides["held_out"])) / positions
    assert abs(left_out - across / sampled) < 0.02
    with pytest.raises(ValueError, match="region 'validation' is not one of"):
        patch_script.OverlappingPatches(("coins",), size, "validation")


def test_a_tiny_patch_run_resumes_exactly_and_the_driver_reports_it(study, patch_script, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(patch_script, "STUDY_PHOTOS", ("coins",))
    config = patch_script.RunConfig(
        method="softmax-knn_ce",
        codebook_size=32,
        rows=48,
        steps=4,
        patch_size=4,
        options={"memory_efficient": True, "backend": "cpu"},
        log_every=2,
        eval_every=2,
        eval_stride=64,
        checkpoint_every=2,
    )
    first = patch_script.train(config, tmp_path / "run")
    held_out = patch_script.OverlappingPatches(("coins",), 4, "held_out")
    assert first["val_rows"] == len(held_out) and first["step"] == 4 and 0 < first["val_code_use"] <= 1
    assert first["train_rows"] == len(range(0, len(patch_script.OverlappingPatches(("coins",), 4, "train")), 2))
    assert 0 < first["train_code_use"] <= 1 and first["processes"] == 1
    assert first["rows_per_step_over_km"] == 48 / 64 and first["cpu_seconds_per_step"] > 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [row["step"] for row in history if "val_subset/code_use" in row] == [2.0, 4.0]
    # the step-2 checkpoint remains: a second call resumes there and must end exactly where the first did
    final_model = torch.load(tmp_path / "run" / "final_model.pt", weights_only=True)
    again = patch_script.train(config, tmp_path / "run")
    for key in ("val_code_use", "val_perplexity", "val_rmse", "train_individual_perplexity", "train_code_use"):
        assert again[key] == first[key], key
    for name, value in torch.load(tmp_path / "run" / "final_model.pt", weights_only=True)["model"].items():
        assert torch.equal(value, final_model["model"][name]), name
    with pytest.raises(ValueError, match="other settings"):
        patch_script.train(dataclasses.replace(config, rows=40), tmp_path / "run")

    # the driver's table and plot from two seeds of one setting: mean and spread
    labels = {"method": "softmax-knn_ce", "M": 32, "N": 48, "K": 2, "steps": 4}
    outcome = {"results": first, "history": history, "wall_seconds": 3.0}
    other = {**first, "val_code_use": first["val_code_use"] / 2}
    runs = [study.Run(f"patches/a{seed}", "patches", (), tuple({**labels, "seed": seed}.items())) for seed in (0, 1)]
    outcomes = {runs[0].key: outcome, runs[1].key: {**outcome, "results": other}}
    settings = study.Settings(corpus=tmp_path, out=tmp_path / "runs")
    table = study.write_study("large_codebook", runs, outcomes, settings, tmp_path / "results")
    lines = table.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("| method | KNN weight | M | N (rows/step) | processes | K |")
    mean = 100 * 0.75 * first["val_code_use"]
    assert f"| {mean:.1f}% ± " in lines[2] and "| 0.75 |" in lines[2] and "| 2 |" in lines[2]
    assert f"| {100 * first['train_code_use']:.1f}% ± 0.0 |" in lines[2] and "| one-cycle |" in lines[2]
    payload = json.loads((tmp_path / "results" / "large_codebook.json").read_text())
    assert payload["rows"][0]["seeds"] == [0, 1] and len(payload["runs"]) == 2
    assert math.isclose(payload["rows"][0]["val_code_use"], 0.75 * first["val_code_use"])
    assert (tmp_path / "results" / "large_codebook.png").read_bytes()[:4] == b"\x89PNG"
    study.write_study("large_codebook_levers", runs, outcomes, settings, tmp_path / "results")
    assert (tmp_path / "results" / "large_codebook_levers.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("distance", ["cosine", "euclid"])
def test_blocked_nearest_code_search_matches_the_core_search_across_blocks(patch_script, distance):
    torch = pytest.importorskip("torch")
    from simplexvq.hard import nearest_codes

    generator = torch.Generator().manual_seed(1)
    rows, codes = torch.randn(500, 6, generator=generator), torch.randn(100, 6, generator=generator)
    expected = nearest_codes(rows[:, None], codes[None], distance).indices[:, 0]
    for block in (7, 64, 512):  # several blocks with a ragged last one, and a single block
        assert torch.equal(patch_script.nearest_code(rows, codes, distance, block=block), expected)


def test_a_cost_only_run_times_steps_without_held_out_metrics(study, patch_script, tmp_path, monkeypatch):
    monkeypatch.setattr(patch_script, "STUDY_PHOTOS", ("coins",))
    config = patch_script.RunConfig(
        method="ste-cosine", codebook_size=16, rows=32, steps=2, patch_size=4, eval_every=1, cost_only=True
    )
    results = patch_script.train(config, tmp_path / "run")
    assert math.isnan(results["val_code_use"]) and results["val_rows"] == 0 and results["cpu_seconds_per_step"] > 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert not any("val_subset/code_use" in row for row in history)
    assert not (tmp_path / "run" / "running.pid").exists()  # removed when the run ends
    settings = study.Settings(corpus=tmp_path, out=tmp_path / "runs")
    costs = study.study_runs("large_codebook_cost", settings)
    assert {(run.label["method"], run.label["M"]) for run in costs} == {
        (method, m) for method in study.PATCH_METHODS for m in (16384, 65536)
    }
    assert all("--cost-only" in run.overrides for run in costs)
    labels = {"method": "ste-cosine", "M": 16, "N": 32, "K": 2, "steps": 2, "seed": 0}
    run = study.Run("patches/cost", "patches", (), tuple(labels.items()))
    outcome = {"results": results, "history": history, "wall_seconds": 1.0}
    table = study.write_study("large_codebook_cost", [run], {run.key: outcome}, settings, tmp_path / "results")
    assert "| n/a |" in table and (tmp_path / "results" / "large_codebook_cost.png").is_file()


def test_two_processes_search_neighbours_globally_and_evaluate_every_row_once(patch_script, tmp_path):
    """A 2-process gloo run under torchrun: the ranks' held-out shares add up to every held-out row, and the
    driver launches such a run with torchrun."""
    import os
    import subprocess

    script = REPO / "benchmarks" / "large_codebook.py"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        f"--output-dir={tmp_path / 'run'}",
        "--method=softmax-knn_ce",
        "--codebook-size=32",
        "--rows=24",
        "--steps=3",
        "--eval-every=3",
        "--eval-stride=997",
        "--train-eval-stride=997",
        "--lr-schedule=constant",
        "--option",
        "memory_efficient=true",
        "backend=cpu",
        "knn_scope=global",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    held_out = patch_script.OverlappingPatches(patch_script.STUDY_PHOTOS, 8, "held_out")
    train = patch_script.OverlappingPatches(patch_script.STUDY_PHOTOS, 8, "train")
    assert results["processes"] == 2 and results["val_rows"] == len(held_out)
    assert results["train_rows"] == len(range(0, len(train), 997)) and results["searched_rows_over_km"] == 48 / 64
    assert results["lr_schedule"] == "constant" and 0 < results["val_code_use"] <= 1
    assert not (tmp_path / "run" / "running.pid").exists()


def test_the_driver_launches_two_process_and_constant_rate_runs_in_their_own_folders(study, settings):
    run = study.patch_run(
        settings, "softmax-knn_ce", 16384, processes=2, lr_schedule="constant", options=["knn_scope=global"]
    )
    command = study.command(run, settings)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[5] == str(study.LARGE_CODEBOOK_SCRIPT) and "--lr-schedule=constant" in command
    assert run.key.endswith("-constant-x2-seed0") and run.processes == 2
    plain = study.patch_run(settings, "softmax-knn_ce", 16384)
    assert plain.key != run.key and study.command(plain, settings)[1] == str(study.LARGE_CODEBOOK_SCRIPT)

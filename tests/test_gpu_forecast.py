"""The GPU forecast and the occupancy arithmetic of benchmarks/gpu (no GPU needed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"gpu_{name}"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_forecast_counts_eight_gemm_equivalents_and_the_floor_six():
    forecast = _load("forecast")
    n, m, d, g, k = 1024, 512, 64, 2, 8
    for precision in forecast.PRECISIONS:
        costs = forecast.kernel_costs(n, m, d, g, k, precision)
        product = 2.0 * n * m * d * g
        assert [cost.gemms for cost in costs] == [2, 1, 5]
        assert sum(cost.flops for cost in costs) == pytest.approx(8 * product)
        assert forecast.floor_cost(n, m, d, g, precision).flops == pytest.approx(6 * product)
        assert all(cost.exps == n * m * g and cost.hbm_bytes > 0 for cost in costs)


def test_forecast_roofline_takes_the_slowest_resource():
    forecast = _load("forecast")
    gpu = forecast.GPUS["H100 SXM"]
    cost = forecast.KernelCost("x", 1, flops=989.5e12, hbm_bytes=3.35e12 * 2, l2_bytes=0.0, exps=0.0)
    times = forecast.resource_ms(cost, gpu, "bf16")
    assert times["products"] == pytest.approx(1000.0) and times["memory"] == pytest.approx(2000.0)
    rows = forecast.forecast()
    assert {row["gpu"] for row in rows} == set(forecast.GPUS)
    for row in rows:
        assert row["low_ms"] <= row["high_ms"]
        assert row["ratio_to_floor_products"][0] >= 1.33  # never below the products' 8 / 6 (rounded)
    assert "| H200 SXM | bf16 |" in forecast.markdown(rows)


def test_occupancy_for_sm_90():
    compile_check = _load("compile_check")
    # 255 registers x 8 warps: one program per SM, 8 of 64 warps
    assert compile_check.occupancy(255, 45056, 8, 90) == {
        "blocks_per_sm": 1,
        "occupancy": 0.125,
        "limited_by": "registers",
    }
    # 64 registers x 4 warps: registers allow 8 programs, shared memory 13, warps 16 -> 8 programs, 32 warps
    assert compile_check.occupancy(64, 16384, 4, 90)["occupancy"] == 0.5
    # shared memory binds: 100 KiB per program leaves room for two
    assert compile_check.occupancy(32, 100 * 1024, 4, 90) == {
        "blocks_per_sm": 2,
        "occupancy": 0.125,
        "limited_by": "shared memory",
    }

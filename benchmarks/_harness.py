"""Shared pieces of the benchmarks: the layers under test, one forward+backward step, timing, peak memory.

Every benchmark script imports this module (``benchmarks/`` is on ``sys.path`` when a script in it runs). A case is
a dict ``{"layer", "n", "m", "d", ...}``; :func:`measure_in_subprocess` runs it in a fresh Python process and
returns its timings and memory, so that the peak resident set size (``VmHWM``, the kernel's high-water mark of the
process's own physical memory) belongs to that case alone. ``python benchmarks/_harness.py '<json case>'`` is that
subprocess.

Time is the median over repeats of one forward + backward (``loss = sum(w * quantized) + auxiliary loss``, ``w`` a
fixed random upstream gradient), both wall-clock and process CPU time (``time.process_time``). With one thread the
CPU time is the work done, insensitive to other processes sharing the cores; the wall time is what a user waits.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
KNN_K = 8
MIB = 1024.0**2

LAYERS = (
    "softmax-knn_ce",  # ours, dense (the paper's computation)
    "softmax-knn_ce-efficient",  # ours, memory_efficient=True
    "softmax-none",  # bare softmax quantizer, dense
    "softmax-none-efficient",  # bare softmax quantizer, streamed
    "ste-euclid",
    "rotation-euclid",
    "vector-quantize-pytorch",  # lucidrains VectorQuantize with its defaults (rotation trick, EMA codebook)
    "fairseq2-gumbel",  # fairseq2 GumbelWav2Vec2VectorQuantizer + wav2vec 2.0 diversity loss
)


@dataclass
class Layer:
    """A layer under test and how to take one training step through it."""

    module: torch.nn.Module
    inputs: torch.Tensor
    step: Callable[[], torch.Tensor]


def build_layer(case: dict) -> Layer:
    """Build the layer of ``case`` with its input (N rows of D features) and a fixed upstream gradient."""
    n, m, d = case["n"], case["m"], case["d"]
    name = case["layer"]
    torch.manual_seed(0)
    z = torch.randn(1, n, d, requires_grad=True)
    upstream = torch.randn(1, n, d)
    if name.startswith(("softmax", "ste", "rotation")):
        simplexvq = importlib.import_module(case.get("package", "simplexvq"))

        efficient = name.endswith("-efficient")
        preset = name.removesuffix("-efficient")
        knn = importlib.import_module("simplexvq").quantizer_traits(preset).knn
        overrides = {"knn_k": case.get("k", KNN_K)} if knn else {}
        if efficient:
            overrides.update(memory_efficient=True, chunk_size=case.get("chunk_size"))
        if case.get("backend"):
            overrides["backend"] = case["backend"]
        if case.get("vertex_subsample"):
            overrides["vertex_subsample"] = case["vertex_subsample"]
        module = simplexvq.build_quantizer(preset, dim=d, codebook_size=m, **overrides)

        def step() -> torch.Tensor:
            out = module(z)
            return (out.quantized * upstream).sum() + out.loss

    elif name == "vector-quantize-pytorch":
        from vector_quantize_pytorch import VectorQuantize

        module = VectorQuantize(dim=d, codebook_size=m)

        def step() -> torch.Tensor:
            quantized, _, commit_loss = module(z)
            return (quantized * upstream).sum() + commit_loss.sum()

    elif name == "fairseq2-gumbel":
        from fairseq2.models.wav2vec2.vector_quantizer import GumbelWav2Vec2VectorQuantizer

        module = GumbelWav2Vec2VectorQuantizer(d, d, 1, m, (2.0, 0.5, 0.999995))

        def step() -> torch.Tensor:
            out = module(z)
            diversity = (m - out.prob_perplexity) / m  # wav2vec 2.0's diversity loss, weight 0.1
            return (out.quantized_vectors * upstream).sum() + 0.1 * diversity

    else:
        raise ValueError(f"unknown layer {name!r}; known: {', '.join(LAYERS)}")
    module.train()
    return Layer(module=module, inputs=z, step=step)


def load_baseline(revision: str) -> str:
    """Import the core library as it was at git ``revision`` under the name ``simplexvq_baseline`` (its files
    copied to a temporary folder with the package name rewritten), so that a benchmark can time the old and the
    current code side by side in one process. Returns the module name."""
    name = "simplexvq_baseline"
    root = Path(tempfile.mkdtemp(prefix="simplexvq-baseline-"))
    listing = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", revision, "plugin/simplexvq"],
        cwd=BENCH_DIR.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for path in listing:
        if not path.endswith(".py"):
            continue
        source = subprocess.run(
            ["git", "show", f"{revision}:{path}"], cwd=BENCH_DIR.parent, capture_output=True, text=True, check=True
        ).stdout
        target = root / name / Path(path).relative_to("plugin/simplexvq")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(re.sub(r"\bsimplexvq\b", name, source))
    sys.path.insert(0, str(root))
    importlib.import_module(name)
    return name


def count_ops(layer: Layer) -> dict[str, int]:
    """Aten ops of one training step (forward + backward) of ``layer``, and how many of them would force a
    device-to-host sync on a GPU (:class:`simplexvq.scale.sync_audit.SyncAudit`). Each op is a kernel launch on a
    GPU (views aside)."""
    from simplexvq.scale.sync_audit import SyncAudit

    train_step(layer)  # warm-up: backends are made and kernels loaded outside the count
    with SyncAudit() as audit:
        train_step(layer)
    return {"ops": len(audit.ops), "syncing": len(audit.syncing)}


def train_step(layer: Layer) -> None:
    layer.module.zero_grad(set_to_none=True)
    layer.inputs.grad = None
    layer.step().backward()


def time_steps(layer: Layer, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds of ``repeats`` forward+backward steps."""
    cpu, wall = round_robin({"step": lambda: train_step(layer)}, repeats)
    return wall["step"], cpu["step"]


def round_robin(
    runners: dict[str, Callable[[], None]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(CPU seconds, wall seconds) per runner over ``repeats`` rounds, each round calling every runner once, so
    that load on a shared machine hits them alike."""
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    wall: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            started_wall, started_cpu = time.perf_counter(), time.process_time()
            run()
            cpu[name].append(time.process_time() - started_cpu)
            wall[name].append(time.perf_counter() - started_wall)
    return cpu, wall


def sample_stats(samples: list[float]) -> dict[str, float | int]:
    """Median and spread of timing samples: ``median``, ``min``, ``max``, ``spread`` ((max - min) / median) and
    the number of samples ``n``. The median is the number to report; the spread says how far to trust it."""
    if not samples:
        return {"n": 0}
    median = statistics.median(samples)
    low, high = min(samples), max(samples)
    return {
        "n": len(samples),
        "median": median,
        "min": low,
        "max": high,
        "spread": (high - low) / median if median > 0 else 0.0,
    }


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of ``numerator / denominator``: two runners timed in the same round-robin met the same
    load in each round, so their per-round ratio is steadier than the ratio of their medians."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def device_samples(
    step: Callable[[], object], device: torch.device, repeats: int, deadline: float | None = None
) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``step`` (after the caller's warm-up): CUDA events around each call on a
    GPU, the wall clock on the CPU. Stops early, with the samples it has, once ``time.time()`` passes
    ``deadline`` (at least one sample is taken)."""
    samples: list[float] = []
    for _ in range(repeats):
        if samples and deadline is not None and time.time() > deadline:
            break
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            torch.cuda.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            started = time.perf_counter()
            step()
            samples.append(1000.0 * (time.perf_counter() - started))
    return samples


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process's own memory so far (``VmHWM``).

    ``ru_maxrss`` is not used on Linux: after ``fork`` + ``exec`` it also holds the parent's peak, which would
    charge the parent benchmark's memory to the case. Falls back to ``ru_maxrss`` where ``/proc`` is missing.
    """
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> float:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs``); returns the current RSS in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    current = _status_mib("VmRSS")
    return current if current is not None else peak_rss_mib()


def run_case(case: dict) -> dict:
    """Measure one case in this process: baseline and peak RSS, median step time (after ``warmup`` steps)."""
    torch.set_num_threads(case.get("threads", 1))
    # One step of a tiny instance first: library and runtime initialisation is not charged to the case.
    tiny = {"n": min(case["n"], max(64, case.get("k", KNN_K))), "m": min(case["m"], 64)}
    tiny.update(chunk_size=None, vertex_subsample=None)
    train_step(build_layer({**case, **tiny}))
    layer = build_layer(case)
    setup_peak = peak_rss_mib()
    baseline = reset_peak_rss()  # RSS with the layer and its input built; the step's peak is measured from here
    for _ in range(case.get("warmup", 1)):
        train_step(layer)
    walls, cpus = time_steps(layer, case.get("repeats", 3))
    step_peak = peak_rss_mib()
    return {
        **case,
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "wall_all_s": walls,
        "cpu_all_s": cpus,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": max(setup_peak, step_peak),
        "step_rss_mib": step_peak - baseline,
    }


def measure_in_subprocess(case: dict, timeout: float = 3600.0) -> dict:
    """Run :func:`run_case` in a fresh interpreter (so the peak RSS is this case's own) and return its result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(case.get("threads", 1)), PYTHONWARNINGS="ignore")
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(case)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if completed.returncode != 0:
        return {**case, "error": completed.stderr.strip().splitlines()[-1] if completed.stderr else "failed"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def dense_softmax_bytes(n: int, m: int, groups: int = 1, bytes_per_element: int = 4) -> int:
    """Bytes of one (N, G, M) float32 tensor: the unit in which the dense path's memory grows."""
    return n * groups * m * bytes_per_element


def environment() -> dict:
    """Machine and library versions, stored with every result."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "load_average_at_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else "unknown"
    except OSError:
        info["cpu_model"] = "unknown"
    try:
        info["memory_gib"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024.0**3
    except (ValueError, OSError):
        pass
    return info


def save(name: str, payload: dict, markdown: str) -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS_DIR / f"{name}.md").write_text(markdown)
    print(markdown)


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt_mib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.0f} MiB"


if __name__ == "__main__":
    print(json.dumps(run_case(json.loads(sys.argv[1]))))

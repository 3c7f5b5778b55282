"""One-shot GPU check: CUDA tests, the layer's timings, and the training steps users run, inside one time budget.

Run from the repository root on a machine with a GPU, after ``python benchmarks/gpu/prepare.py`` here put the
wheels it needs into ``benchmarks/gpu/wheels/`` (see README.md for the device-tool command)::

    PYTHONPATH=plugin:recipes:vision_adapter python benchmarks/gpu/run.py --out $OUT

It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` after every stage, so a run cut short leaves what
it measured. Stages, in this order (the numbers first), each guarded by the remaining budget (default 420 s for
the whole run):

1. Wheels: the packages of ``wheels/`` that are not installed are installed offline (``pip install --no-index
   --find-links``) into a folder appended to ``sys.path`` (nothing installed is replaced).
2. Layer: forward + backward of the six-GEMM floor, the dense path, the reference backend, the Triton backend with
   and without KNN-CE, the ``ProductQuantizer`` (dense and on the Triton backend, under autocast for the half
   dtype) and vector-quantize-pytorch, per size and dtype.
3. Models: one training step (forward, backward, AdamW) of wav2vec 2.0 BASE under bf16 autocast and of the
   64x64x32 vision autoencoder, each with the dense layer and the reference and Triton backends, built by the
   recipes' own builders.
4. Tests: ``tests/test_triton_backend.py`` on CUDA tensors, then the backends' and the sync-free step's tests
   under the machine's torch, in pytest subprocesses with a timeout.
5. With two or more GPUs: the global KNN over NCCL against one process holding every shard.

Each group of measurements runs in a subprocess killed at the remaining budget (what it finished is kept); inside,
a measurement whose forecast (its first call, or the same method at a smaller size) exceeds the remaining time is
skipped, and each takes several samples after warm-up (median and spread). Every "triton" measurement is checked
for a fallback to the reference backend (the backend's ``fell_back`` / ``fallback_reason`` and its warning): a
fallback fails the check (exit status 2) and the report names the cause. The dtypes the kernels received are
recorded from the dispatched ``simplexvq.triton_*`` operators.

``--dry-run`` runs everything on the CPU at tiny sizes (Triton's interpreter, float16 for the half dtype);
``tests/test_gpu_check.py`` runs it, with ``--simulate-fallback`` (the kernels made unimportable) and a tiny
``--budget-s``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
WHEELS = Path(__file__).resolve().parent / "wheels"
PATHS = [REPO / "plugin", REPO / "recipes", REPO / "vision_adapter", BENCH]
JSON_NAME, MD_NAME = "gpu_check.json", "gpu_check.md"

FULL_SIZES = [(16384, 1024, 256), (65536, 8196, 64), (65536, 65536, 64), (262144, 16384, 64)]
QUICK_SIZES = [(16384, 1024, 256), (65536, 8196, 64)]
DRY_SIZES = [(24, 12, 8)]
KNN_K = 8
TEMPERATURE = 0.1
LAYER_METHODS = [
    "six-GEMM floor",
    "dense",
    "reference",
    "triton",
    "triton, no KNN",
    "layer, dense",
    "layer, triton",
    "vector-quantize-pytorch",
]
MODEL_BACKENDS = ["dense", "reference", "triton"]
REPORT_RESERVE_S = 15.0
"""Seconds kept back from the budget for writing the report after the last stage (a tenth of a smaller budget)."""


# --------------------------------------------------------------------------------------------------------------
# Set-up: paths and offline wheels
# --------------------------------------------------------------------------------------------------------------


def use_checkout() -> None:
    for path in PATHS:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def wheel_distribution(path: Path) -> str:
    """The normalised distribution name of a wheel file (``torch_einops_utils-0.2.9-py3-none-any.whl``)."""
    return path.name.split("-")[0].lower().replace("_", "-")


def install_wheels(wheels: Path, site: Path) -> dict:
    """Install offline, into ``site`` (appended to ``sys.path`` and ``PYTHONPATH``), every wheel in ``wheels`` whose
    distribution is not installed already; returns what was installed, skipped and any pip error."""
    from importlib import metadata

    files = sorted(wheels.glob("*.whl"))
    missing = []
    for path in files:
        try:
            metadata.version(wheel_distribution(path))
        except metadata.PackageNotFoundError:
            missing.append(path)
    record: dict = {"folder": str(wheels), "wheels": len(files), "installed": [p.name for p in missing]}
    if missing:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels)]
        command += ["--no-deps", "--no-compile", "--no-cache-dir", "--target", str(site), *map(str, missing)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            record["error"] = (done.stderr or done.stdout)[-2000:]
    if site.exists():
        sys.path.append(str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(site)]))
    return record


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in PATHS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------------------------------------------
# Measurements (run in a worker subprocess)
# --------------------------------------------------------------------------------------------------------------


class KernelAudit:
    """What each ``simplexvq.*`` operator (a Triton launch) received: the dtype of its first floating tensor (the
    queries: the dtype the kernel computes its products in), every floating dtype among its tensors, and its string
    arguments (such as the ``tl.dot`` precision, ``ieee`` or ``tf32``, where the kernels take one)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        seen: dict[str, dict] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = str(func)
                if name.startswith("simplexvq."):
                    flat, _ = tree_flatten((args, kwargs))
                    dtypes = [str(x.dtype).replace("torch.", "") for x in flat if hasattr(x, "dtype")]
                    floating = [d for d in dtypes if d.startswith(("float", "bfloat"))]
                    entry = seen.setdefault(
                        name, {"operands": floating[0] if floating else None, "all": set(), "options": set()}
                    )
                    entry["all"].update(floating)
                    entry["options"].update(x for x in flat if isinstance(x, str))  # e.g. the tl.dot precision
                return func(*args, **kwargs)

        self.mode, self.seen = Mode(), seen

    def result(self) -> dict[str, dict]:
        return {
            name: {**e, "all": sorted(e["all"]), "options": sorted(e["options"])}
            for name, e in sorted(self.seen.items())
        }


def _inputs(n: int, m: int, d: int, dtype, device):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(n, 1, d, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    codebook = torch.randn(1, m, d, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    temperature = torch.full((1,), TEMPERATURE, device=device, dtype=dtype, requires_grad=True)
    return z, codebook, temperature


def _autocast(device, dtype):
    import contextlib

    import torch

    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def layer_step(method: str, case: dict, device) -> tuple[Callable[[], None], list]:
    """One forward + backward of ``method`` on fixed inputs, and the objects to check for a fallback."""
    import torch

    from simplexvq import functional as VQF
    from simplexvq.scale import StreamedRequest
    from simplexvq.scale.backends import ReferenceBackend, TritonBackend

    n, m, d = case["n"], case["m"], case["d"]
    dtype = getattr(torch, case["dtype"])
    z, codebook, temperature = _inputs(n, m, d, dtype, device)
    inputs = [z, codebook, temperature]

    if method == "six-GEMM floor":  # the products of a softmax attention layer, nothing else
        q, k = z.detach()[:, 0], codebook.detach()[0]
        upstream = torch.randn_like(q)

        def step() -> None:
            logits = q @ k.t()
            _ = logits @ k  # output
            grad_logits = upstream @ k.t()
            _ = logits.t() @ upstream  # values
            _ = grad_logits @ k  # queries
            _ = grad_logits.t() @ q  # keys

        return step, []

    if method == "dense":

        def step() -> None:
            log_pi = torch.log_softmax(VQF.cosine_logits(z, codebook, temperature), dim=-1)
            out = torch.einsum("ngm,gmd->ngd", log_pi.exp(), codebook)
            loss = out.float().square().mean() + VQF.knn_loss(log_pi, KNN_K, "ce").float()
            torch.autograd.grad(loss, inputs)

        return step, []

    if method in ("reference", "triton", "triton, no KNN"):
        backend = ReferenceBackend() if method == "reference" else TritonBackend()
        k = None if method == "triton, no KNN" else KNN_K
        request = StreamedRequest(z=z, codebook=codebook, temperature=temperature, knn_k=k)

        def step() -> None:
            result = backend.quantize(request)
            loss = result.quantized.float().square().mean()
            if k is not None:
                loss = loss + result.knn_loss.float()
            torch.autograd.grad(loss, inputs)

        return step, [backend]

    if method in ("layer, dense", "layer, triton"):  # the whole ProductQuantizer, fp32 weights, autocast as users
        import simplexvq

        options = {"memory_efficient": True, "backend": "triton"} if method == "layer, triton" else {}
        layer = simplexvq.build_quantizer("softmax-knn_ce", dim=d, codebook_size=m, knn_k=KNN_K, **options)
        layer = layer.to(device)
        x = z.detach().float().reshape(n, d).requires_grad_(True)
        parameters = [p for p in layer.parameters() if p.requires_grad]

        def step() -> None:
            with _autocast(device, dtype):
                out = layer(x)
                loss = out.quantized.float().square().mean() + out.loss.float()
            torch.autograd.grad(loss, [x, *parameters])

        return step, [layer]

    if method == "vector-quantize-pytorch":
        from vector_quantize_pytorch import VectorQuantize

        layer = VectorQuantize(dim=d, codebook_size=m).to(device)
        x = z.detach().float().reshape(1, n, d).requires_grad_(True)

        def step() -> None:
            with _autocast(device, dtype):
                quantized, _, loss = layer(x)
                total = quantized.float().square().mean() + loss.float().sum()
            torch.autograd.grad(total, [x, *[p for p in layer.parameters() if p.requires_grad]], allow_unused=True)

        return step, []

    raise ValueError(f"unknown layer method {method!r}")


def _filtered(cls, values: dict) -> dict:
    """The entries of ``values`` that are fields of the dataclass ``cls`` (configs change across versions)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in values.items() if key in names}


def _quantizer_options(backend: str) -> dict:
    return {} if backend == "dense" else {"memory_efficient": True, "backend": backend}


def model_step(model: str, backend: str, case: dict, device) -> tuple[Callable[[], None], list]:
    """One training step (forward, backward, AdamW) of a recipe's model with the quantizer on ``backend``."""
    import torch

    from simplexvq import QuantizerSpec

    tiny = case["tiny"]
    generator = torch.Generator(device="cpu").manual_seed(0)
    if model == "wav2vec2-base":
        from simplexvq_recipes.speech.pretraining.config import ModelConfig
        from simplexvq_recipes.speech.pretraining.model import build_model

        spec = QuantizerSpec(method="softmax-knn_ce", codebook_size=24 if tiny else 1024, **_quantizer_options(backend))
        values: dict = {"quantizer": spec}
        if tiny:
            values.update(
                conv_layers=[[32, 10, 5], [32, 3, 2], [32, 2, 2]],
                embed_dim=32,
                num_layers=1,
                num_heads=2,
                ffn_dim=64,
                pos_conv_kernel=16,
                pos_conv_groups=2,
                codebook_dim=16,
                final_dim=16,
                num_negatives=5,
                layer_drop=0.0,
            )
        net = build_model(ModelConfig(**_filtered(ModelConfig, values))).to(device).train()
        batch, samples = (2, 2000) if tiny else (4, 250_000)  # BASE: 4 x 15.6 s of 16 kHz audio per GPU
        waves = torch.randn(batch, samples, generator=generator).to(device)
        lengths = torch.full((batch,), samples, device=device)
        lengths[-1] = samples * 3 // 4  # one padded utterance

        def loss_of() -> torch.Tensor:
            with torch.autocast(
                device_type=device.type, dtype=torch.bfloat16 if device.type == "cuda" else torch.float16
            ):
                return net(waves, lengths).loss.float()

    elif model == "vision-64x64x32":
        import yaml

        from simplexvq_recipes.vision.train import build_autoencoder
        from simplexvq_vision import AutoencoderConfig

        preset = yaml.safe_load((REPO / "recipes/simplexvq_recipes/configs/vision/imagenet_64x64x32.yaml").read_text())
        values = dict(preset["model"])
        quantizer = {**values.pop("quantizer"), **_quantizer_options(backend)}
        image = 256
        if tiny:
            values.update(stem_channels=16, channels=[16, 8], strides=[2, 1], norm_groups=4)
            quantizer.update(codebook_size=24, knn_k=2)
            image = 16
        config = AutoencoderConfig(**_filtered(AutoencoderConfig, values), quantizer=QuantizerSpec(**quantizer))
        net = build_autoencoder(config).to(device).train()
        images = torch.randn(2 if tiny else 16, 3, image, image, generator=generator).to(device)

        def loss_of() -> torch.Tensor:
            out = net(images)
            return torch.nn.functional.mse_loss(out.reconstruction.float(), images) + out.quantizer.loss.float()

    else:
        raise ValueError(f"unknown model {model!r}")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of().backward()
        optimizer.step()

    return step, [net]


def fallback_of(objects: list, caught: list) -> str | None:
    """Why a Triton backend among ``objects`` (or inside a module among them) runs the reference backend, or a
    caught fallback warning's text; ``None`` if none fell back."""
    import torch

    from simplexvq.scale.backends import TritonBackend

    backends = []
    for obj in objects:
        if isinstance(obj, TritonBackend):
            backends.append(obj)
        elif isinstance(obj, torch.nn.Module):
            backends += [m.streamed_backend for m in obj.modules() if hasattr(m, "streamed_backend")]
    for backend in backends:
        if isinstance(backend, TritonBackend) and backend.fell_back:
            return backend.fallback_reason or "fell back (no reason recorded)"
    for warning in caught:
        if "Triton backend cannot run" in str(warning.message):
            return str(warning.message)
    return None


def _dot_precisions(kernel_dtypes: dict) -> dict[str, str]:
    """The ``tl.dot`` precision the kernels chose for each operand dtype (``ieee`` or ``tf32``), where the kernels'
    launcher says (``simplexvq.scale.triton.launch.dot_precision``); empty where it does not choose."""
    import importlib

    import torch

    choose = getattr(importlib.import_module("simplexvq.scale.triton.launch"), "dot_precision", None)
    operands = {entry["operands"] for entry in kernel_dtypes.values() if entry["operands"]}
    return {dtype: choose(getattr(torch, dtype)) for dtype in sorted(operands)} if choose else {}


def measure(task: dict, device, deadline: float) -> dict:
    """One measurement: build, first call, fallback check, forecast, warm-up, samples, kernel dtypes, peak memory."""
    import torch
    from _harness import device_samples, sample_stats

    record = {key: task[key] for key in ("stage", "method", "case")}
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if task["stage"] == "layer":
            step, watched = layer_step(task["method"], task["case"], device)
        else:
            step, watched = model_step(task["case"]["model"], task["method"], task["case"], device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            started = time.perf_counter()
            step()  # first call: compilation, autotuning, caches, the Triton backend's probe
            if cuda:
                torch.cuda.synchronize()
            first_s = time.perf_counter() - started
        record["first_call_s"] = round(first_s, 3)
        if "triton" in task["method"]:
            reason = fallback_of(watched, caught)
            record["fell_back"] = reason is not None
            if reason is not None:
                record["fallback_reason"] = reason
                record["error"] = f"fell back to the reference backend: {reason}"
                return record
        warmup, repeats = task["warmup"], task["repeats"]
        remaining = deadline - time.time()
        per_call = min(first_s, task.get("forecast_s") or first_s)
        if per_call * (warmup + 1) > remaining:
            record["error"] = f"skipped: forecast {per_call * (warmup + 1):.1f} s > {remaining:.1f} s left"
            return record
        if per_call * (warmup + repeats) > remaining:  # fewer samples, still after the warm-up
            repeats = max(1, int(remaining / per_call) - warmup)
            record["note"] = f"{repeats} samples to fit the budget"
        for _ in range(warmup):
            step()
        samples = device_samples(step, device, repeats, deadline)
        record.update(ms=sample_stats(samples)["median"], stats=sample_stats(samples), samples_ms=samples)
        if cuda:
            record["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if "triton" in task["method"] and time.time() < deadline:
            audit = KernelAudit()
            with audit.mode:
                step()
            record["kernel_dtypes"] = audit.result()
            record["dot_precision"] = _dot_precisions(record["kernel_dtypes"])
        record["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    except Exception as error:  # noqa: BLE001 - every failure is a result to report
        record["error"] = f"{type(error).__name__}: {error}"[:500]
        if not isinstance(error, (ImportError, MemoryError)) and "out of memory" not in str(error):
            record["traceback"] = traceback.format_exc(limit=4)[-2000:]
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return record


def worker(spec_path: Path) -> int:
    """Run the tasks of ``spec_path`` (JSON), appending one JSON line per finished measurement to its output."""
    spec = json.loads(spec_path.read_text())
    if spec.get("dry_run"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    use_checkout()
    import torch

    if spec.get("simulate_fallback"):  # the kernels cannot be imported: the Triton backend must fall back
        from simplexvq.scale.backends import triton_backend

        def unimportable():
            raise ImportError("simulated by --simulate-fallback")

        triton_backend.load_triton_kernels = unimportable
    device = torch.device("cpu" if spec.get("dry_run") else "cuda")
    torch.manual_seed(0)
    with open(spec["output"], "a") as output:
        for task in spec["tasks"]:
            if time.time() > spec["deadline"]:
                break
            time.sleep(spec.get("simulate_slow_s", 0.0))  # a slower machine, for the time guard's test
            record = measure(task, device, spec["deadline"])
            output.write(json.dumps(record) + "\n")
            output.flush()
            print(f"{task['method']:24s} {_case_label(task['case'])}: {_cell(record)}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------------
# Stages (the parent process)
# --------------------------------------------------------------------------------------------------------------


class Budget:
    """The run's deadline (wall clock), with a reserve kept for the report."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.deadline = seconds, time.time() + seconds
        self.reserve = min(REPORT_RESERVE_S, seconds / 10)

    def left(self) -> float:
        return self.deadline - self.reserve - time.time()


def run_group(tasks: list[dict], args: argparse.Namespace, budget: Budget, out: Path, index: int) -> list[dict]:
    """Run ``tasks`` in a worker subprocess killed when the budget ends; every task gets a record (the finished
    ones from the worker, the others ``skipped`` or ``timed out``)."""
    left = budget.left()
    if left <= 1.0:
        return [{**_key(t), "error": "skipped: time budget spent"} for t in tasks]
    output = out / f"worker-{index}.jsonl"
    output.unlink(missing_ok=True)
    spec = {
        "tasks": tasks,
        "deadline": time.time() + left,
        "output": str(output),
        "dry_run": args.dry_run,
        "simulate_fallback": args.simulate_fallback,
        "simulate_slow_s": args.simulate_slow_s,
    }
    spec_path = out / f"worker-{index}.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    note = None
    try:
        done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=left + 5.0)
        sys.stdout.write(done.stdout)
        if done.returncode != 0:
            note = f"worker exited with {done.returncode}: {(done.stderr or '')[-1500:]}"
    except subprocess.TimeoutExpired:
        note = "timed out: the worker was stopped at the end of the time budget"
    finished = [json.loads(line) for line in output.read_text().splitlines()] if output.exists() else []
    output.unlink(missing_ok=True)
    spec_path.unlink(missing_ok=True)
    done_keys = {(r["method"], json.dumps(r["case"], sort_keys=True)) for r in finished}
    for task in tasks:
        if (task["method"], json.dumps(task["case"], sort_keys=True)) not in done_keys:
            finished.append({**_key(task), "error": note or "skipped: time budget spent"})
    return finished


def _key(task: dict) -> dict:
    return {key: task[key] for key in ("stage", "method", "case")}


def forecast_s(method: str, case: dict, records: list[dict]) -> float | None:
    """Seconds per call of ``method`` at ``case``, scaled by N M D from its largest smaller measured case."""
    size = case["n"] * case["m"] * case["d"]
    known = [
        (r["case"]["n"] * r["case"]["m"] * r["case"]["d"], r["ms"] / 1000.0)
        for r in records
        if r.get("ms") is not None and r["method"] == method and r["case"]["dtype"] == case["dtype"]
    ]
    known = [(s, t) for s, t in known if s <= size]
    if not known:
        return None
    smaller, seconds = max(known)
    return seconds * size / smaller


def run_pytest(args_list: list[str], env: dict[str, str], timeout: float) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args_list]
    started = time.perf_counter()
    if timeout <= 5.0:
        return {"command": " ".join(command[1:]), "returncode": None, "summary": "skipped: time budget spent"}
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        output, code = f"timed out after {timeout:.0f} s\n{stdout}", None
    summary = [line for line in output.splitlines() if " passed" in line or " failed" in line or " error" in line]
    last = output.strip().splitlines()[-1:] or [""]
    return {
        "command": " ".join(command[1:]),
        "returncode": code,
        "seconds": round(time.perf_counter() - started, 1),
        "summary": (summary or last)[-1],
        "tail": output[-3000:],
    }


def run_tests(args: argparse.Namespace, budget: Budget) -> list[dict]:
    env = subprocess_env()
    if args.dry_run:  # the interpreter on CPU tensors; one cheap case proves the stage
        return [run_pytest(["tests/test_triton_backend.py", "-k", "triton_available"], env, min(120, budget.left()))]
    env["SIMPLEXVQ_TRITON_TEST_DEVICE"] = "cuda"
    env.pop("TRITON_INTERPRET", None)
    cap = 60 if args.quick else 120
    results = [run_pytest(["tests/test_triton_backend.py", "-x"], env, min(cap, budget.left() / 3))]
    # the backends' contract and the sync-free step under this machine's torch (CPU tensors; fake kernels there)
    core = [
        f"tests/{name}.py" for name in ("test_backends", "test_sync_free") if (REPO / "tests" / f"{name}.py").exists()
    ]
    results.append(run_pytest([*core, "-x"], env, min(cap / 2, budget.left() / 4)))
    return results


def layer_tasks(args: argparse.Namespace) -> list[list[dict]]:
    """Groups of layer measurements: one group (one worker process) per size, smallest first, the half dtype
    before float32 in each."""
    sizes = DRY_SIZES if args.dry_run else (QUICK_SIZES if args.quick else FULL_SIZES)
    dtypes = ["float16" if args.dry_run else "bfloat16", "float32"]
    warmup, repeats = (0, 2) if args.dry_run else ((1, 3) if args.quick else (2, 5))
    return [
        [
            {
                "stage": "layer",
                "method": method,
                "case": {"n": n, "m": m, "d": d, "dtype": dtype},
                "warmup": warmup,
                "repeats": repeats,
            }
            for dtype in dtypes
            for method in LAYER_METHODS
        ]
        for n, m, d in sizes
    ]


def model_tasks(args: argparse.Namespace) -> list[list[dict]]:
    warmup, repeats = (0, 2) if args.dry_run else (1, 3)
    return [
        [
            {
                "stage": "model",
                "method": backend,
                "case": {"model": model, "tiny": args.dry_run},
                "warmup": warmup,
                "repeats": repeats,
            }
            for backend in MODEL_BACKENDS
        ]
        for model in ("wav2vec2-base", "vision-64x64x32")
    ]


GLOBAL_KNN = """
import os, torch, torch.distributed as dist
import simplexvq
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
cpu = os.environ.get("SIMPLEXVQ_GLOBAL_KNN_CPU") == "1"  # the script's own check: gloo, CPU, reference backend
device = torch.device("cpu" if cpu else f"cuda:{rank}")
if not cpu:
    torch.cuda.set_device(device)
dist.init_process_group("gloo" if cpu else "nccl")
torch.manual_seed(0)
full = torch.randn(world * 512, 64).to(device)
def build(scope):
    torch.manual_seed(1)
    return simplexvq.build_quantizer("softmax-knn_ce", dim=64, codebook_size=1024, knn_k=8, memory_efficient=True,
                                     backend="reference" if cpu else "triton", knn_scope=scope).to(device)
quantizer = build("global")
loss = quantizer(full.chunk(world)[rank]).losses["knn_ce"]
loss.backward()
backend = quantizer.streamed_backend
fell_back = bool(getattr(backend, "fell_back", False))
if rank == 0:
    expected = build("local")(full).losses["knn_ce"]
    print("RESULT", float(loss), float(expected), fell_back, backend.name, flush=True)
dist.destroy_process_group()
"""


def run_global_knn(budget: Budget, devices: int | None = None, cpu: bool = False) -> dict:
    """Two ranks with the Triton backend over NCCL (``cpu``: gloo and the reference backend, a check of this
    stage itself) against one process holding both shards: the global loss must be the single-process loss."""
    if devices is None:
        import torch

        devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices < 2 and not cpu:
        return {"status": "skipped", "reason": f"{devices} GPU(s): the global KNN over NCCL needs 2 or more"}
    if budget.left() < 30:
        return {"status": "skipped", "reason": "time budget spent"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]
    command += [sys.executable, "-c", GLOBAL_KNN]
    env = subprocess_env()
    if cpu:
        env["SIMPLEXVQ_GLOBAL_KNN_CPU"] = "1"
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=budget.left())
    except subprocess.TimeoutExpired:
        return {"status": "timed out"}
    lines = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode != 0 or not lines:
        return {"status": "error", "returncode": done.returncode, "tail": (done.stdout + done.stderr)[-2000:]}
    loss, expected, fell_back, backend = float(lines[0][0]), float(lines[0][1]), lines[0][2] == "True", lines[0][3]
    ok = math.isclose(loss, expected, rel_tol=1e-4) and not fell_back
    return {
        "status": "ok" if ok else ("fell back" if fell_back else "mismatch"),
        "backend": backend,
        "loss": loss,
        "single_process_loss": expected,
        "fell_back": fell_back,
    }


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _case_label(case: dict) -> str:
    if "model" in case:
        return case["model"]
    return f"{case['n']}, {case['m']}, {case['d']} {case['dtype']}"


def _cell(record: dict | None) -> str:
    if record is None:
        return "-"
    if record.get("error"):
        first = record["error"].splitlines()[0]
        if record.get("fell_back"):
            return "FELL BACK"
        return "OOM" if "out of memory" in first else first[:70]
    stats = record.get("stats", {})
    spread = f" ±{50 * stats['spread']:.0f}%" if stats.get("n", 0) > 1 else ""
    peak = "" if record.get("peak_mib") is None else f", {record['peak_mib']:,.0f} MiB"
    return f"{record['ms']:.2f} ms{spread}{peak}"


def failures(report: dict) -> list[str]:
    """What makes the check fail: a "triton" measurement that fell back to the reference backend (the global
    KNN's included)."""
    failed = [
        f"{r['method']} at {_case_label(r['case'])} fell back to the reference backend: {r.get('fallback_reason')}"
        for r in report["measurements"]
        if r.get("fell_back")
    ]
    if report.get("global_knn", {}).get("fell_back"):
        failed.append("the global KNN over NCCL fell back to the reference backend")
    return failed


def markdown(report: dict) -> str:
    from _harness import table

    lines = [
        "# GPU check",
        "",
        f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}, Python {report['python']}; "
        f"`torch.get_float32_matmul_precision()` = {report['float32_matmul_precision']}; {report['mode']} mode; "
        f"{report.get('seconds', '?')} s of a {report['budget_s']:.0f} s budget.",
        f"Wheels: {report['wheels'].get('wheels', 0)} in the folder, installed: "
        f"{', '.join(report['wheels'].get('installed', [])) or 'none needed'}"
        + (f"; pip error: {report['wheels']['error'].splitlines()[-1]}" if report["wheels"].get("error") else ""),
        "Times: median milliseconds after warm-up (± half the range of the samples), peak allocated memory.",
        "",
    ]
    failed = failures(report)
    if failed:
        lines += ["## FAILED: fallback to the reference backend", "", *(f"- {line}" for line in failed), ""]
    lines += ["## Tests", ""]
    lines += [
        f"- `{t['command']}`: rc {t.get('returncode')}, {t.get('summary') or 'no summary'}" for t in report["tests"]
    ]
    layer = [r for r in report["measurements"] if r["stage"] == "layer"]
    for dtype in sorted({r["case"]["dtype"] for r in layer}):
        rows = [r for r in layer if r["case"]["dtype"] == dtype]
        sizes = sorted({(r["case"]["n"], r["case"]["m"], r["case"]["d"]) for r in rows}, key=lambda s: s[0] * s[1])
        body = []
        for size in sizes:
            by_method = {r["method"]: r for r in rows if (r["case"]["n"], r["case"]["m"], r["case"]["d"]) == size}
            body.append([", ".join(map(str, size)), *(_cell(by_method.get(m)) for m in LAYER_METHODS)])
        lines += ["", f"## Layer, {dtype} (K = {KNN_K}, G = 1, cosine logits, temperature {TEMPERATURE})", ""]
        lines.append(table(["N, M, D", *LAYER_METHODS], body))
    ratios = []
    for r in layer:
        if r["method"] != "triton" or r.get("ms") is None:
            continue
        same = {o["method"]: o["ms"] for o in layer if o["case"] == r["case"] and o.get("ms") is not None}
        parts = []
        if "six-GEMM floor" in same:
            parts.append(f"{r['ms'] / same['six-GEMM floor']:.2f}x the floor")
        if "dense" in same:
            parts.append(f"dense / triton = {same['dense'] / r['ms']:.2f}")
        if "triton, no KNN" in same:
            parts.append(f"KNN-CE overhead {100 * (r['ms'] / same['triton, no KNN'] - 1):+.1f}%")
        ratios.append(f"- {_case_label(r['case'])}: " + ", ".join(parts))
    if ratios:
        lines += ["", "Goals (Triton backend): within 2x of the floor, faster than dense, KNN-CE overhead < 10%.", ""]
        lines += ratios
    models = [r for r in report["measurements"] if r["stage"] == "model"]
    if models:
        body = []
        for model in sorted({r["case"]["model"] for r in models}):
            by_backend = {r["method"]: r for r in models if r["case"]["model"] == model}
            body.append([model, *(_cell(by_backend.get(b)) for b in MODEL_BACKENDS)])
        lines += ["", "## Training steps (forward, backward, AdamW; wav2vec2 under bf16 autocast)", ""]
        lines.append(table(["model", *MODEL_BACKENDS], body))
    dtypes = [r for r in report["measurements"] if r.get("kernel_dtypes")]
    if dtypes:
        lines += ["", "## Dtypes the Triton kernels received", ""]
        for r in dtypes:
            operands = sorted({str(e["operands"]) for e in r["kernel_dtypes"].values()})
            everything = sorted({d for e in r["kernel_dtypes"].values() for d in e["all"]})
            options = sorted({o for e in r["kernel_dtypes"].values() for o in e.get("options", [])})
            lines.append(
                f"- {r['method']} at {_case_label(r['case'])}: operands {', '.join(operands)} "
                f"(all tensors: {', '.join(everything)})"
                + (f"; options {', '.join(options)}" if options else "")
                + (
                    f"; tl.dot {', '.join(f'{k}: {v}' for k, v in r['dot_precision'].items())}"
                    if r.get("dot_precision")
                    else ""
                )
            )
    knn = report["global_knn"]
    detail = knn.get("reason") or (
        f"loss {knn['loss']:.6g}, one process {knn['single_process_loss']:.6g}" if "loss" in knn else ""
    )
    lines += ["", f"## Global KNN over NCCL: {knn.get('status', '-')}" + (f" ({detail})" if detail else ""), ""]
    errors = [r for r in report["measurements"] if r.get("error") and not r.get("fell_back")]
    if errors:
        lines += ["", "## Not measured", ""]
        lines += [f"- {r['method']} at {_case_label(r['case'])}: {r['error'].splitlines()[0]}" for r in errors]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--quick", action="store_true", help="two sizes, fewer samples")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton's interpreter)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 420; dry run 600)")
    parser.add_argument("--skip-tests", action="store_true", help="no pytest stage")
    parser.add_argument("--skip-models", action="store_true", help="no training-step stage")
    parser.add_argument("--wheels", default=str(WHEELS), help="folder of wheels to install offline")
    parser.add_argument(
        "--simulate-fallback", action="store_true", help="make the kernels unimportable (checks the fallback check)"
    )
    parser.add_argument(
        "--simulate-slow-s",
        type=float,
        default=0.0,
        help="sleep this long before each measurement (checks the time guard whatever the machine's speed)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(Path(args.worker))
    budget = Budget(args.budget_s or (600.0 if args.dry_run else 420.0))
    started = time.time()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    if args.out is None:
        raise SystemExit("run.py: name an output folder with --out or $OUT")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    use_checkout()
    wheels = install_wheels(Path(args.wheels), Path(os.environ.get("TMPDIR", "/tmp")) / "simplexvq-gpu-site")
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("run.py: no CUDA device; use --dry-run to check the script on the CPU")
    report: dict = {
        "mode": "dry-run" if args.dry_run else ("quick" if args.quick else "full"),
        "device": f"{torch.cuda.get_device_name()} x {torch.cuda.device_count()}" if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "budget_s": budget.seconds,
        "wheels": wheels,
        "tests": [],
        "measurements": [],
        "global_knn": {},
    }

    def save() -> None:
        report["seconds"] = round(time.time() - started, 1)
        (out / JSON_NAME).write_text(json.dumps(report, indent=1))
        (out / MD_NAME).write_text(markdown(report))

    save()
    groups = layer_tasks(args) + ([] if args.skip_models else model_tasks(args))
    for index, tasks in enumerate(groups):  # the numbers first, the tests with the time left
        for task in tasks:
            if task["stage"] == "layer":
                task["forecast_s"] = forecast_s(task["method"], task["case"], report["measurements"])
        report["measurements"] += run_group(tasks, args, budget, out, index)
        save()
    if not args.skip_tests:
        report["tests"] = run_tests(args, budget)
        save()
    report["global_knn"] = {"status": "skipped", "reason": "dry run"} if args.dry_run else run_global_knn(budget)
    save()
    failed = failures(report)
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    print((out / MD_NAME).read_text())
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
